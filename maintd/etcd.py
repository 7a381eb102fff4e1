"""etcd for cluster mode, through the JSON gateway of etcd's v3 API, over the standard library's http.client.

Our own client rather than a library's, because none beats the little that is needed: five paths of the gateway
(/v3/kv/txn for every read and write, /v3/lease/grant, /v3/lease/keepalive, /v3/kv/lease/revoke,
/v3/maintenance/status) and its watch stream, which was read here already under etcd3gw (its own watch ends
silently, or hangs, on a dropped stream or an error). And a call through etcd3gw and `requests` cost ~2.2 ms of CPU
(a member's reading in a switch, measured on a 2-core VM) where it costs ~0.7 ms here: during a switch, every
member's calls share the cores with etcd and the other members, and that CPU sits on the path of every member's
maintenance window.

What a call does: it is tried on the endpoint that answered last, then on each other one in turn; it has a timeout;
it goes over a connection kept alive from call to call, one per thread and endpoint (connections are never shared
between threads), closed when a call on it fails and opened afresh by the next, and tried once more on a fresh one
when etcd had closed it meanwhile. A watch has a connection of its own, and its end is the end of `watch`, as is a
stream silent for `idle` seconds. A watch is only ever a hint (see
changes.py): the keys read are the truth. Anything that fails on every endpoint is `EtcdUnavailable`: the caller
decides what waiting means.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")
TIMEOUT = 2.0  # seconds for one call to one endpoint
HEADERS = {"Content-Type": "application/json"}


class EtcdUnavailable(Exception):
    """No endpoint answered: quorum lost, or the network to etcd gone."""


class Refused(Exception):
    """An endpoint answered with an error (etcd's own, in the gateway's JSON: no leader, a request too large)."""


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


class Gateway:
    """One thread's connection to one endpoint, kept alive from call to call (http.client's connections are not
    for sharing between threads): JSON POSTed to /v3/..., the JSON answer back."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        url = urlsplit(endpoint)
        self.https = url.scheme == "https"
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 2379
        self.timeout = timeout
        self.connection = self.new_connection()

    def new_connection(self) -> http.client.HTTPConnection:
        """A connection, not yet open: http.client opens it at its first request, and again after `close`."""
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=self.timeout)

    def post(self, path: str, body: Any) -> Any:
        """The answer to `body` at `path`. A connection kept alive that the server has closed meanwhile (etcd
        restarted) fails as the request is sent or its answer awaited: tried once more on a fresh connection,
        since the server never saw it. Any other failure is the endpoint's."""
        payload = json.dumps(body).encode()
        kept = self.connection.sock is not None
        try:
            return self._exchange(path, payload)
        except (ConnectionResetError, BrokenPipeError):  # http.client's RemoteDisconnected is a ConnectionResetError
            if not kept:
                raise
        return self._exchange(path, payload)

    def _exchange(self, path: str, payload: bytes) -> Any:
        try:
            self.connection.request("POST", path, payload, HEADERS)
            response = self.connection.getresponse()
            answer = response.read()
            if response.status != 200:
                raise Refused(_refusal(response.status, answer))
        except BaseException:
            self.connection.close()  # in an unknown state: the next call opens a fresh one
            raise
        return json.loads(answer)

    def stream(self, path: str, body: Any, idle: float) -> Generator[bytes, None, None]:
        """The lines of a streaming answer to `body` at `path`, on a connection of its own (the kept one stays free
        for calls): the first within `timeout`, each next one within `idle` seconds, else socket.timeout. Closing
        the generator closes the connection."""
        connection = self.new_connection()
        try:
            connection.connect()
            sock = connection.sock
            connection.request("POST", path, json.dumps(body).encode(), HEADERS)
            response = connection.getresponse()
            try:
                if response.status != 200:
                    raise Refused(_refusal(response.status, response.read()))
                yield response.readline()
                sock.settimeout(idle)
                while line := response.readline():
                    yield line
            finally:
                response.close()
        finally:
            connection.close()


def _refusal(status: int, answer: bytes) -> str:
    """What an error answer says: the gateway's JSON error (`{"error": ..., "code": ...}`), else its start."""
    try:
        said = json.loads(answer)
        message = (said.get("message") or said.get("error")) if isinstance(said, dict) else None
    except ValueError:
        message = None
    return f"HTTP {status}: {message or answer[:200].decode(errors='replace')}"


class Etcd:
    def __init__(self, endpoints: tuple[str, ...], timeout: float = TIMEOUT) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self._preferred = 0  # the endpoint that answered last
        self._local = threading.local()

    def _gateway(self, index: int) -> Gateway:
        gateways: dict[int, Gateway] = self._local.__dict__.setdefault("gateways", {})
        if index not in gateways:
            gateways[index] = Gateway(self.endpoints[index], self.timeout)
        return gateways[index]

    def _call(self, what: Callable[[Gateway], T]) -> T:
        """`what` on the endpoint that answered last, then on each other one; EtcdUnavailable if none does."""
        problems = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self._preferred + step) % count
            try:
                result = what(self._gateway(index))
            except (OSError, http.client.HTTPException, Refused, ValueError, KeyError) as exc:
                problems.append(f"{self.endpoints[index]}: {type(exc).__name__} {exc}".strip())
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
        result = self._call(lambda gateway: gateway.post("/v3/kv/txn", body))
        found = {}
        for response in result.get("responses", []):
            for kv in response.get("response_range", {}).get("kvs", []):
                found[base64.b64decode(kv["key"]).decode()] = base64.b64decode(kv.get("value", "")).decode()
        # the gateway writes etcd's int64 numbers (revisions, lease IDs, TTLs) as JSON strings
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

        def open_stream(gateway: Gateway) -> tuple[Generator[bytes, None, None], dict[str, Any]]:
            lines = gateway.stream("/v3/watch", {"create_request": create}, idle)
            try:
                first = json.loads(next(lines, b"") or b"{}").get("result", {})
                if not first.get("created"):
                    raise Refused(f"no watch: {first}")
            except BaseException:
                lines.close()
                raise
            return lines, first

        lines, first = self._call(open_stream)
        last = after or int(first.get("header", {}).get("revision", 0))
        opened(last)
        try:
            for result in chain([first], (json.loads(line).get("result", {}) for line in lines if line.strip())):
                if result.get("canceled"):  # etcd ended it: compacted past `after`, or an error of its own
                    return 0 if result.get("compact_revision") else last
                for event in result.get("events", []):
                    last = int(event["kv"]["mod_revision"])
                    seen(last, base64.b64decode(event["kv"]["key"]).decode())
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            pass  # broken, garbled, or silent for `idle` seconds: the caller opens another from `last`
        finally:
            lines.close()
        return last

    def put(self, key: str, value: str, lease: int = 0) -> None:
        self.txn([], [put_op(key, value, lease)])

    def txn(self, compare: list[Compare], success: list[dict[str, Any]]) -> bool:
        """One transaction: `success` happens if every `compare` holds; whether it did. etcd serialises them, so
        of two racing transactions on the same keys exactly one sees its conditions hold."""
        return self.txn_reading(compare, success, [])[0]

    def grant(self, ttl: float) -> int:
        return int(self._call(lambda gateway: gateway.post("/v3/lease/grant", {"TTL": max(1, round(ttl))}))["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's new TTL; -1 once it has expired (its keys are gone)."""
        result = self._call(lambda gateway: gateway.post("/v3/lease/keepalive", {"ID": lease}))
        return int(result.get("result", {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self._call(lambda gateway: gateway.post("/v3/kv/lease/revoke", {"ID": lease}))

    def answers(self) -> bool:
        try:
            self._call(lambda gateway: gateway.post("/v3/maintenance/status", {}))
        except EtcdUnavailable:
            return False
        return True
