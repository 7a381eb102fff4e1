"""Emptying memcached after a swap, so the new code never reads the old code's cached objects.

One pymemcache `Client` per server (a HashClient skips recently failed servers silently), with timeouts (none by
default), and `noreply=False` (the default returns before the server has flushed anything).
"""

from __future__ import annotations

from dataclasses import dataclass

from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheError

from .config import FlushMode


@dataclass(frozen=True)
class Outcome:
    server: str
    error: str | None  # None: flushed


def flush(servers: tuple[str, ...], mode: FlushMode, namespace_key: str, timeout: float) -> list[Outcome]:
    """Flush every server (`all`) or bump this app's namespace key (`namespace`); one outcome per server.

    A server that is down is reported, never raised: a cold cache elsewhere must not fail a deploy.
    """
    outcomes = []
    for server in servers:
        host, _, port = server.rpartition(":")
        client = Client((host.strip("[]"), int(port)), connect_timeout=timeout, timeout=timeout)
        try:
            if mode is FlushMode.ALL:
                client.flush_all(noreply=False)
            else:
                # incr on a missing key returns None; add first (a no-op when it exists).
                client.add(namespace_key, b"0", noreply=False)
                client.incr(namespace_key, 1, noreply=False)
            outcomes.append(Outcome(server, None))
        except (OSError, MemcacheError) as exc:
            outcomes.append(Outcome(server, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__))
        finally:
            client.close()
    return outcomes
