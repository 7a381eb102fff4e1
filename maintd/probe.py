"""Where the app listens, and whether it answers: looked at as the app's own user (boot.py says when and why).

maintd does not run this module itself: it hands the module's source to the system's Python
(`/usr/bin/python3 -I -c SOURCE ROOT RELEASE WINDOW HEADER`), started as `hooks.user`, the user that runs
`restart.command` and so the app. So it imports the standard library only, and nothing of maintd, whose checkout or
virtualenv that user may not be allowed to read (a clone under /root is mode 0700).

As that user it sees what the kernel shows that user, which is what the wait needs and no more:
- The processes. Reading another user's /proc/<pid>/cwd and /proc/<pid>/fd takes CAP_SYS_PTRACE, which the shipped
  unit does not give maintd, and under its ProtectProc=invisible another user's processes are not even listed; a
  process's own user reads them. Only the user's own processes count, so a socket that another local user leaves in
  a release (any user can enter one: uploads are 0755) never decides the wait.
- The connection. It is made with the user's rights, never root's: no path or address that a listing shows can
  lead it to a socket only root may reach. A Unix socket counts only below the root, with no `..` on its way, and is
  connected to only while the name there is a socket itself (not a link swapped in); a TCP socket only on this
  host's own addresses (IP_FREEBIND lets any user listen on someone else's, and a probe there would be a request
  sent, from this host, wherever the user chose).

It prints one line of JSON: the listening sockets of the user's processes whose working directory is a release of
ROOT, each with the processes that hold it. With a RELEASE, it first waits, for WINDOW seconds at most, for one of
the sockets held by that release's processes only to answer a request (with HEADER, maintd's health header) with
any HTTP status, and says which; it looks again every POLL_INTERVAL for sockets that appear (Puma listens again once
re-executed), and asks every such socket at once, each for PROBE_TIMEOUT at most, so one that accepts and never
answers delays no other.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import re
import socket
import stat
import sys
import threading
import time

PROBE_TIMEOUT = 3.0  # seconds one socket is asked for at most: one that accepts and never answers costs no more
POLL_INTERVAL = 0.2  # seconds between looks at /proc while no socket has answered
_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp
_UNIX_ACCEPTING = 1 << 16  # __SO_ACCEPTCON in /proc/net/unix's flags
_UNIX_STREAM = 1
# "%pK: %08X %08X %08X %04X %02X %5lu" and then " " and the path exactly as bound, spaces and all
_UNIX_LINE = re.compile(r"[0-9a-fA-F]+: [0-9A-F]+ [0-9A-F]+ ([0-9A-F]+) ([0-9A-F]+) [0-9A-F]+ +(\d+) (.+)")
_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")
_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3})[ \r\n]")
_NONLOCAL_BIND = {socket.AF_INET: "/proc/sys/net/ipv4/ip_nonlocal_bind",
                  socket.AF_INET6: "/proc/sys/net/ipv6/ip_nonlocal_bind"}

Address = tuple[str, int] | str  # (host, port) or a Unix socket's path


def listeners(root: str) -> dict[Address, list[tuple[int, str]]]:
    """Every listening socket of this user's processes whose working directory is in `root`/releases/, each with
    (pid, release) of the processes holding it."""
    releases = os.path.realpath(os.path.join(root, "releases")) + "/"
    tcp, unix = _tcp_listeners(), _unix_listeners(root)
    me = os.getuid()
    holders: dict[int, list[tuple[int, str]]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != me:
                continue
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
            if not cwd.startswith(releases):
                continue
            inodes = _sockets_held(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
        release = cwd[len(releases):].split("/", 1)[0]
        for inode in sorted(inodes & (tcp.keys() | unix.keys())):
            holders.setdefault(inode, []).append((int(entry.name), release))
    held: dict[Address, list[tuple[int, str]]] = {}
    for inode, by in holders.items():
        if address := unix.get(inode) or _local(*tcp[inode]):
            held[address] = by
    return held


def _sockets_held(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found = _SOCKET_LINK.fullmatch(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed meanwhile
            continue
        if found:
            inodes.add(int(found.group(1)))
    return inodes


def _tcp_listeners() -> dict[int, tuple[socket.AddressFamily, str]]:
    """inode -> (family, address as /proc/net/tcp shows it), for every listening TCP socket."""
    found: dict[int, tuple[socket.AddressFamily, str]] = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(table) as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == _TCP_LISTEN:
                        found[int(fields[9])] = family, fields[1]
        except OSError:
            continue
    return found


def _local(family: socket.AddressFamily, hex_address: str) -> tuple[str, int] | None:
    """/proc/net/tcp's `0100007F:1F90` -> ("127.0.0.1", 8080); a wildcard is reached on loopback; None for an
    address that is not this host's."""
    raw, port = hex_address.split(":")
    packed = bytes.fromhex(raw)
    # the kernel prints each 32-bit word in host order (little-endian here)
    packed = b"".join(packed[i:i + 4][::-1] for i in range(0, len(packed), 4))
    host = ipaddress.ip_address(socket.inet_ntop(family, packed))
    if host.is_unspecified:
        return ("127.0.0.1" if family is socket.AF_INET else "::1"), int(port, 16)
    mapped = getattr(host, "ipv4_mapped", None)
    if not (host.is_loopback or (mapped and mapped.is_loopback)) and not _ours(family, str(host)):
        return None
    return str(host), int(port, 16)


def _ours(family: socket.AddressFamily, host: str) -> bool:
    """Whether `host` is an address of this host: a socket binds to it without IP_FREEBIND. Where the system lets
    any address be bound (ip_nonlocal_bind), nothing but loopback is taken as ours."""
    try:
        with open(_NONLOCAL_BIND[family]) as setting:
            if setting.read().strip() != "0":
                return False
    except OSError:
        return False
    try:
        with socket.socket(family, socket.SOCK_STREAM) as trial:
            trial.bind((host, 0))
    except OSError:
        return False
    return True


def _unix_listeners(root: str) -> dict[int, str]:
    """inode -> path, for every listening stream socket bound to a path below `root` with no `..` on its way."""
    tops = {root.rstrip("/") + "/", os.path.realpath(root) + "/"}
    found: dict[int, str] = {}
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="surrogateescape", newline="\n") as lines:
            next(lines, None)
            for line in lines:
                fields = _UNIX_LINE.fullmatch(line.removesuffix("\n"))
                if not fields or not int(fields[1], 16) & _UNIX_ACCEPTING or int(fields[2], 16) != _UNIX_STREAM:
                    continue
                path = fields[4]
                if path.startswith("/") and ".." not in path.split("/"):
                    path = os.path.normpath(path)
                    if any(path.startswith(top) for top in tops):
                        found[int(fields[3])] = path
    except OSError:
        pass
    return found


def ask(address: Address, request: bytes, timeout: float) -> int:
    """The HTTP status the socket at `address` answers `request` with; OSError (refused, timed out, closed, not
    HTTP, a Unix socket's name no longer a socket) otherwise."""
    deadline = time.monotonic() + timeout
    if isinstance(address, str):
        if not stat.S_ISSOCK(os.lstat(address).st_mode):
            raise OSError(f"{address} is no longer a socket")
        family = socket.AF_UNIX
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(address)
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        conn.sendall(request)
        head = b""
        while b"\n" not in head and len(head) < 64:
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = conn.recv(64)
            if not chunk:
                break
            head += chunk
    status = _STATUS_LINE.match(head)
    if not status:
        raise OSError(f"no HTTP answer ({head[:32]!r})")
    return int(status.group(1))


def first_answer(root: str, release: str, request: bytes, window: float) -> dict[str, object]:
    """Ask every socket that only `release`'s processes hold, looking again every POLL_INTERVAL for new ones (Puma
    listens again once re-executed), each asked at once and for PROBE_TIMEOUT at most, until one answers or
    `window` seconds are over: the first answer as {"address", "status"}, and why each other did not answer."""
    deadline = time.monotonic() + window
    answers: queue.Queue[tuple[Address, int | str]] = queue.Queue()
    asking: set[Address] = set()
    again: dict[Address, float] = {}  # when a socket that did not answer is asked next
    unanswered: dict[str, str] = {}

    def one(address: Address, timeout: float) -> None:
        try:
            answers.put((address, ask(address, request, timeout)))
        except OSError as exc:
            answers.put((address, "timed out" if isinstance(exc, TimeoutError) else str(exc.strerror or exc)))

    while True:
        found, now = listeners(root), time.monotonic()
        if now < deadline:
            # A socket is the new release's only when every process holding it runs there: in Puma's phased
            # restart the master moves into the new release at once, while the old workers, which answer, are
            # replaced one by one.
            for address in [a for a, holders in found.items() if {r for _, r in holders} == {release}]:
                if address not in asking and again.get(address, now) <= now:
                    asking.add(address)
                    timeout = min(PROBE_TIMEOUT, deadline - now)
                    threading.Thread(target=one, args=(address, timeout), daemon=True).start()
        elif not asking:
            break
        try:
            address, said = answers.get(timeout=POLL_INTERVAL if now < deadline else PROBE_TIMEOUT)
        except queue.Empty:
            if now < deadline:
                continue
            break  # every probe is bounded: one still out after that is no answer
        asking.discard(address)
        if isinstance(said, int):
            return {"listeners": _listed(found), "answered": {"address": shown(address), "status": said}}
        unanswered[shown(address)] = said
        again[address] = time.monotonic() + POLL_INTERVAL
    return {"listeners": _listed(found), "answered": None, "unanswered": unanswered}


def _listed(found: dict[Address, list[tuple[int, str]]]) -> list[dict[str, object]]:
    return [{"address": shown(address), "holders": holders} for address, holders in found.items()]


def shown(address: Address) -> str:
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: list[str]) -> None:
    root, release, window, header = argv[0], argv[1], float(argv[2]), argv[3]
    if release:
        request = f"GET / HTTP/1.0\r\nHost: localhost\r\n{header}: 1\r\nConnection: close\r\n\r\n".encode()
        report = first_answer(root, release, request, window)
    else:
        report = {"listeners": _listed(listeners(root))}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
