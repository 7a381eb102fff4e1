"""A TCP proxy between one maintd and an etcd member's client port, which a test cuts off while the daemon runs.

Cutting a member off from etcd for real, without touching the etcd cluster that the other members keep using: the
member's config names the proxy (`etcd = [proxy.url]`), and the proxy forwards bytes both ways until the test says
`refuse()` (connections in progress are reset, new ones refused: etcd's host is down) or `silence()` (connections in
progress and new ones are held open, and nothing is ever answered: a network that drops packets). `forward()` lets
new connections through again; connections silenced stay silent, as a client whose packets were lost must time out.
It counts the requests it forwards by path (`count`), and can cut the member's watch streams alone: `silence_watches`
holds them open and silent (a watch that ends silently), `end_watches` closes them (a stream that ends).
"""

from __future__ import annotations

import re
import socket
import threading
from collections import Counter

from conftest import free_port

REQUEST = re.compile(rb"(?:GET|POST|PUT) (/v3/[\w/]+) HTTP/1\.1\r\n")


class Link:
    """One client's connection and the proxy's connection upstream for it."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.silent = False
        self.watch = False  # it carries a watch stream

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class EtcdProxy:
    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.lock = threading.Lock()
        self.links: list[Link] = []
        self.held: list[socket.socket] = []  # accepted while silent: never answered
        self.silent = False
        self.listener: socket.socket | None = None
        self.requests: Counter[str] = Counter()
        self.pattern = b""  # the next request that carries it is held (`hold`)
        self.holding = threading.Event()  # one is held now
        self.let_go = threading.Event()  # ... until this is set
        self._listen()

    def hold(self, pattern: bytes) -> None:
        """The next request the member sends that carries `pattern` is held at the proxy, as a slow network would
        hold it, until `let_go` is set: `holding` is set meanwhile. Dropped, not sent, if the member has given up
        on it (closed its connection) by then: etcd never applies a request its client no longer waits for."""
        self.pattern = pattern

    def count(self, path: str) -> int:
        """How many requests for `path` (`/v3/kv/txn`, `/v3/watch`) the member sent through the proxy."""
        with self.lock:
            return self.requests[path]

    def silence_watches(self) -> int:
        """The watch streams open now are held open and never deliver again; how many there were."""
        with self.lock:
            watches = [link for link in self.links if link.watch]
            for link in watches:
                link.silent = True
        return len(watches)

    def end_watches(self) -> int:
        """The watch streams open now are closed, as a stream that ends; how many there were."""
        with self.lock:
            watches = [link for link in self.links if link.watch]
            self.links = [link for link in self.links if not link.watch]
        for link in watches:
            link.close()
        return len(watches)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def refuse(self) -> None:
        """Every connection reset, and none accepted: connecting fails with ECONNREFUSED."""
        with self.lock:
            if self.listener:
                # shutdown wakes the accept() blocked on it: a close alone does not, and the connection that accept()
                # then takes would still be forwarded (a member's lease kept alive through it for good)
                self.listener.shutdown(socket.SHUT_RDWR)
                self.listener.close()
                self.listener = None
            for link in self.links:
                link.close()
            self.links.clear()

    def silence(self) -> None:
        """Every connection, open or new, accepted and never answered."""
        with self.lock:
            self.silent = True
            for link in self.links:
                link.silent = True
        if self.listener is None:
            self._listen()

    def forward(self) -> None:
        """New connections reach etcd again."""
        with self.lock:
            self.silent = False
        if self.listener is None:
            self._listen()

    def stop(self) -> None:
        self.refuse()
        for sock in self.held:
            sock.close()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self.lock:
            self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: refusing
            with self.lock:
                if self.listener is not listener:  # refused meanwhile
                    client.close()
                    return
                if self.silent:
                    self.held.append(client)
                    continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            link = Link(client, upstream)
            with self.lock:
                if self.listener is not listener:  # refused while this one was being connected: reset it too
                    link.close()
                    return
                link.silent = self.silent  # or silenced meanwhile: silent too
                self.links.append(link)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(link, src, dst), daemon=True).start()

    def _pump(self, link: Link, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
                if src is link.client:
                    self._saw(link, data)
                    if self.pattern and self.pattern in data:
                        self.pattern = b""
                        self.holding.set()
                        self.let_go.wait(60)
                        if _closed(src):
                            break  # the member gave up on it meanwhile
                if not link.silent:  # silenced: what comes in is dropped, as a lossy network would
                    dst.sendall(data)
            except OSError:
                break
        if not link.silent:
            link.close()

    def _saw(self, link: Link, data: bytes) -> None:
        """Count the requests that begin in what the member sent (http.client sends a request's head whole)."""
        paths = [path.decode() for path in REQUEST.findall(data)]
        with self.lock:
            self.requests.update(paths)
            link.watch = link.watch or "/v3/watch" in paths


def _closed(sock: socket.socket) -> bool:
    """Whether the peer closed `sock` (what it sent before is read already)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
