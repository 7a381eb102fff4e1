"""A hostile (or merely busy) local user of the control socket, run as that user by the tests: standard library only,
so the system's Python can run it from a directory any user can read.

    socket_peer.py flood PATH MOST   keep up to MOST connections open, never sending a thing; open a new one for each
                                     the daemon closes; a JSON line with the counts every 0.2 s
    socket_peer.py hold PATH COUNT   open COUNT connections one after another, ask `status` on each and keep those
                                     answered, asking again every second; a JSON line with the counts each round

Both run until their stdin closes, then close everything.
"""

from __future__ import annotations

import json
import resource
import select
import socket
import sys
import time

STATUS = b'{"cmd": "status"}\n'


def report(**counts: object) -> None:
    print(json.dumps(counts), flush=True)


def stdin_closed(timeout: float) -> bool:
    return bool(select.select([sys.stdin], [], [], timeout)[0])


def flood(path: str, most: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, most + 64), hard))
    held: dict[int, socket.socket] = {}
    poller = select.poll()
    poller.register(sys.stdin, select.POLLIN)
    opened = closed = refused = 0
    last = 0.0
    while True:
        while len(held) < most:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except OSError:  # EAGAIN: the backlog is full; try again after the next round
                sock.close()
                break
            held[sock.fileno()] = sock
            poller.register(sock, select.POLLIN)
            opened += 1
        for fd, _ in poller.poll(50):
            if fd == sys.stdin.fileno():
                return
            sock = held.pop(fd)
            poller.unregister(fd)
            try:
                said = sock.recv(4096)
            except OSError:
                said = b""
            refused += b"too many connections" in said
            closed += 1
            sock.close()
        if time.monotonic() - last > 0.2:
            report(held=len(held), opened=opened, closed=closed, refused=refused)
            last = time.monotonic()


def ask(sock: socket.socket) -> dict[str, object]:
    try:
        sock.sendall(STATUS)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed at once: the daemon's reason is still to be read, as maintctl reads it
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        line += chunk
    answer: dict[str, object] = json.loads(line.splitlines()[0])
    return answer


def hold(path: str, count: int) -> None:
    held: list[socket.socket] = []
    errors: list[str] = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
        try:
            answer = ask(sock)
        except (OSError, ValueError) as exc:
            answer = {"ok": False, "error": repr(exc)}
        if answer.get("ok"):
            held.append(sock)
        else:
            errors.append(str(answer.get("error")))
            sock.close()
    report(held=len(held), refused=len(errors), errors=sorted(set(errors)))
    while not stdin_closed(1.0):
        for sock in list(held):
            try:
                ask(sock)
            except (OSError, ValueError):
                held.remove(sock)
                sock.close()
        report(held=len(held))


if __name__ == "__main__":
    mode, where, number = sys.argv[1], sys.argv[2], int(sys.argv[3])
    (flood if mode == "flood" else hold)(where, number)
