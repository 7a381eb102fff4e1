"""2,000 random and mutated requests against a real daemon's socket; afterwards it still deploys correctly."""

import json
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

COMMANDS = ["status", "releases", "history", "deploy", "rollback", "maintenance", "restart", "flush", "pause",
            "resume"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
arg_dicts = st.dictionaries(st.sampled_from(["release", "n", "state", "reason", "until", "follow", "wait", "x"]),
                            json_values, max_size=4)
well_formed = st.builds(lambda cmd, args: json.dumps({"cmd": cmd, "args": args}).encode(),
                        st.sampled_from(COMMANDS) | st.text(max_size=12), arg_dicts | json_values)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(well_formed))
    for _ in range(draw(st.integers(1, 4))):
        op, at = draw(st.sampled_from(["flip", "cut", "insert"])), draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


requests = well_formed | mutated() | st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())


def exchange(path: str, payload: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(payload.replace(b"\n", b" ") + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_fuzzed_requests_never_hurt_the_daemon(app, start_daemon):
    app.make_release("r1")
    daemon = start_daemon()
    daemon.deployed("r1")
    path = str(app.socket)
    seen = {"ok": 0, "error": 0}

    @settings(max_examples=2000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(requests)
    def one(payload: bytes) -> None:
        lines = exchange(path, payload)
        assert lines, "every request line gets an answer"
        final = lines[-1]
        assert all("event" in line for line in lines[:-1])
        assert isinstance(final.get("ok"), bool)
        if not final["ok"]:
            assert isinstance(final["error"], str) and final["error"]
        seen["ok" if final["ok"] else "error"] += 1

    one()
    assert sum(seen.values()) >= 2000 and seen["error"] > 0
    assert daemon.proc.poll() is None
    for request in ({"cmd": "maintenance", "args": {"state": "off"}}, {"cmd": "resume"}):
        assert exchange(path, json.dumps(request).encode())[-1]["ok"]
    assert app.live() == "r1"
    app.make_release("r2")
    assert daemon.deployed("r2")["result"] == "ok"
    assert app.live() == "r2" and not (app.current / "tmp" / "maintenance.txt").exists()
