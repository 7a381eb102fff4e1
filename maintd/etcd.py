"""etcd for cluster mode, through etcd3gw (the JSON gateway of etcd's v3 API), wrapped thinly.

What the wrapper adds, because etcd3gw leaves it out (checked in its 2.7.0 source): a client speaks to one endpoint,
so every call is tried on each configured endpoint in turn, starting with the last that answered; every call has a
timeout; a requests Session is not shared between threads, so each thread gets its own clients; the watch stream is
read here, not through etcd3gw's watch, which ends silently (or hangs) on a dropped stream or an error: here its end
is the end of `watch`, and a stream silent for `idle` seconds ends too. A watch is only ever a hint (see changes.py):
the keys read are the truth. Anything that fails on every endpoint is `EtcdUnavailable`: the caller decides what
waiting means.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:  # imported where a client is made: a lone server never loads requests (~7 MB of RSS)
    from etcd3gw.client import Etcd3Client

T = TypeVar("T")
TIMEOUT = 2.0  # seconds for one call to one endpoint


class EtcdUnavailable(Exception):
    """No endpoint answered: quorum lost, or the network to etcd gone."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Reading(NamedTuple):
    """Keys read in one transaction, and the revision of etcd's store they are of."""

    found: dict[str, str]
    revision: int


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction, in the gateway's JSON."""

    body: dict[str, Any]

    @classmethod
    def absent(cls, key: str) -> Compare:
        return cls({"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": 0})

    @classmethod
    def present(cls, key: str) -> Compare:
        return cls({"key": _b64(key), "target": "CREATE", "result": "GREATER", "create_revision": 0})

    @classmethod
    def equals(cls, key: str, value: str) -> Compare:
        return cls({"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)})


def _after(prefix: str) -> str:
    """The end of the range of keys that start with `prefix`: its last byte plus one."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def put_op(key: str, value: str, lease: int = 0) -> dict[str, Any]:
    return {"request_put": {"key": _b64(key), "value": _b64(value), **({"lease": lease} if lease else {})}}


def delete_op(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


class Etcd:
    def __init__(self, endpoints: tuple[str, ...], timeout: float = TIMEOUT) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self._preferred = 0  # the endpoint that answered last
        self._local = threading.local()

    def _client(self, index: int) -> Etcd3Client:
        from etcd3gw.client import Etcd3Client

        clients: dict[int, Etcd3Client] = self._local.__dict__.setdefault("clients", {})
        if index not in clients:
            url = urlsplit(self.endpoints[index])
            clients[index] = Etcd3Client(host=url.hostname or "127.0.0.1", port=url.port or 2379,
                                         protocol=url.scheme, timeout=self.timeout, api_path="/v3/")
        return clients[index]

    def _call(self, what: Callable[[Etcd3Client], T]) -> T:
        """`what` on the endpoint that answered last, then on each other one; EtcdUnavailable if none does."""
        from etcd3gw.exceptions import Etcd3Exception

        problems = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self._preferred + step) % count
            try:
                result = what(self._client(index))
            except (Etcd3Exception, OSError, ValueError, KeyError) as exc:
                problems.append(f"{self.endpoints[index]}: {type(exc).__name__} {getattr(exc, 'detail_text', '')}"
                                .strip())
                continue
            self._preferred = index
            return result
        raise EtcdUnavailable("etcd did not answer (" + "; ".join(problems) + ")")

    def read(self, wanted: list[str], writes: tuple[dict[str, Any], ...] = ()) -> Reading:
        """Several keys and prefixes (those ending in "/") in one round trip, as one consistent snapshot: a
        transaction with no condition whose every operation is a range read, after `writes` (put_op), if any:
        a member says where it is and learns where the others are in the same round trip."""
        return self.txn_reading([], list(writes), wanted)[1]

    def txn_reading(self, compare: list[Compare], success: list[dict[str, Any]], wanted: list[str],
                    failure: tuple[dict[str, Any], ...] = ()) -> tuple[bool, Reading]:
        """`txn` (`failure` written where `success` is not), and `wanted` read in the same transaction after it,
        whether its conditions held or not."""
        ranges = [{"request_range": {"key": _b64(key), **({"range_end": _b64(_after(key))}
                                                          if key.endswith("/") else {})}} for key in wanted]
        body = {"compare": [c.body for c in compare], "success": [*success, *ranges], "failure": [*failure, *ranges]}
        result = self._call(lambda client: client.transaction(body))
        found = {}
        for response in result.get("responses", []):
            for kv in response.get("response_range", {}).get("kvs", []):
                found[base64.b64decode(kv["key"]).decode()] = base64.b64decode(kv.get("value", "")).decode()
        return bool(result.get("succeeded", False)), Reading(found, int(result.get("header", {}).get("revision", 0)))

    def watch(self, prefix: str, after: int, opened: Callable[[int], None], seen: Callable[[int, str], None],
              idle: float) -> int:
        """Follow every change under `prefix` after revision `after` (0: from now) until the stream ends, breaks
        or stays silent for `idle` seconds: `opened(revision)` once it is open, with the revision it follows on
        from, then `seen(revision, key)` for each change, in order. Returns the last revision it followed on to
        (resume after it), 0 when etcd no longer holds the history after `after` (compacted: start afresh).
        EtcdUnavailable when no endpoint opens a stream."""
        create: dict[str, Any] = {"key": _b64(prefix), "range_end": _b64(_after(prefix))}
        if after:
            create["start_revision"] = after + 1

        def open_stream(client: Etcd3Client) -> tuple[Any, Any, dict[str, Any]]:
            response = client.session.post(client.get_url("/watch"), json={"create_request": create}, stream=True,
                                           timeout=(self.timeout, idle))
            lines = response.iter_lines()
            first = json.loads(next(lines, b"") or b"{}").get("result", {})
            if response.status_code != 200 or not first.get("created"):
                response.close()
                raise ValueError(f"no watch: HTTP {response.status_code} {first}")
            return response, lines, first

        response, lines, first = self._call(open_stream)
        last = after or int(first.get("header", {}).get("revision", 0))
        opened(last)
        try:
            for result in chain([first], (json.loads(line).get("result", {}) for line in lines if line)):
                if result.get("canceled"):  # etcd ended it: compacted past `after`, or an error of its own
                    return 0 if result.get("compact_revision") else last
                for event in result.get("events", []):
                    last = int(event["kv"]["mod_revision"])
                    seen(last, base64.b64decode(event["kv"]["key"]).decode())
        except (OSError, ValueError, KeyError):
            pass  # broken, garbled, or silent for `idle` seconds: the caller opens another from `last`
        finally:
            response.close()
        return last

    def put(self, key: str, value: str, lease: int = 0) -> None:
        self.txn([], [put_op(key, value, lease)])

    def txn(self, compare: list[Compare], success: list[dict[str, Any]]) -> bool:
        """One transaction: `success` happens if every `compare` holds; whether it did. etcd serialises them, so
        of two racing transactions on the same keys exactly one sees its conditions hold."""
        return self.txn_reading(compare, success, [])[0]

    def grant(self, ttl: float) -> int:
        return self._call(lambda client: client.lease(ttl=max(1, round(ttl)))).id

    def keepalive(self, lease: int) -> int:
        """The lease's new TTL; -1 once it has expired (its keys are gone)."""
        result = self._call(lambda client: client.post(client.get_url("/lease/keepalive"), json={"ID": lease}))
        return int(result.get("result", {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self._call(lambda client: client.post(client.get_url("/kv/lease/revoke"), json={"ID": lease}))

    def answers(self) -> bool:
        try:
            self._call(lambda client: client.status())
        except EtcdUnavailable:
            return False
        return True
