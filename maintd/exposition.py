"""Where the metrics go: an HTTP endpoint for Prometheus, and files written whenever they change (node_exporter's
textfile, the counters kept in state.dir), each in threads of its own.

Neither is ever in a deploy's way: a deploy only counts in memory (metrics.py) and wakes a writer. A scraper that
reads slowly holds its own connection's thread (and that thread for `Endpoint.TIMEOUT` at most), and scrapers
together hold `Endpoint.CONNECTIONS` threads and descriptors at most, never those a deploy needs; a textfile
directory that hangs (a dead NFS server) holds its writer thread, and the changes meanwhile are written together
once it comes back, as one file.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .deadline import cut_off_after

PATH = "/metrics"
# The text format generate_latest writes, named as Prometheus 2 knows it (prometheus-client 0.22 and later call it
# "version=1.0.0", the same bytes for names like ours, which Prometheus before 3.0 does not know by that name).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Endpoint:
    """`metrics.listen`: GET of /metrics in Prometheus' text format; any other method 405, any other path
    404. Accepts in a thread of its own (blocked in accept(2), so idle it never wakes), one thread per connection
    (and a timer to cut it off), CONNECTIONS at most."""

    # Seconds a connection may take, all told, to send its request and read the answer. http.server's own timeout
    # is per read, which a client that sends a byte now and then (slowloris) restarts for ever: past this the
    # connection is shut down whatever it is doing.
    TIMEOUT = 10.0
    # Connections answered at once; one more is closed as soon as it is accepted. Prometheus scrapes a target one
    # scrape at a time, so a few servers and a person with curl fit; without a bound, every connection a client
    # opens is a thread and a descriptor of the daemon's, until a deploy finds none left for its own files.
    CONNECTIONS = 8
    # Seconds before accept(2) is tried again after it failed for want of something (descriptors, memory): the
    # endpoint outlives a moment when the daemon ran out, rather than ending its thread for good.
    ACCEPT_RETRY = 0.1

    def __init__(self, address: tuple[str, int], render: Callable[[], bytes]) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        handler = type("Handler", (_Handler,), {"render": staticmethod(render), "timeout": self.TIMEOUT})
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
        self.server = server_class(address, handler)  # binds now: OSError when it cannot
        self.slots = threading.BoundedSemaphore(self.CONNECTIONS)
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="maintd-metrics-http", daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def _accept(self) -> None:
        sock = self.server.socket
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:  # shut down (`close`), or out of descriptors for a moment (EMFILE, ENFILE, ENOBUFS)
                if self.closing.wait(self.ACCEPT_RETRY):
                    return
                continue
            if self.slots.acquire(blocking=False):
                threading.Thread(target=self._serve, args=(conn, peer), name="maintd-metrics-scrape",
                                 daemon=True).start()
            else:
                conn.close()  # CONNECTIONS are being answered already

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        """One connection, answered (and closed) by http.server, and cut off at TIMEOUT if it is not done by then."""
        cut = cut_off_after(conn, self.TIMEOUT)
        try:
            self.server.process_request_thread(conn, peer)
        finally:
            cut.cancel()
            self.slots.release()

    def close(self) -> None:
        """Stop listening at once (the port is free when this returns); a scrape being answered finishes."""
        self.closing.set()
        try:
            self.server.socket.shutdown(socket.SHUT_RDWR)  # wakes the accept(2)
        except OSError:
            pass
        self.thread.join()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    render: Callable[[], bytes]  # the exposition
    server_version = "maintd"

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != PATH:
            self._plain(404, f"not found: metrics are at {PATH}\n")
            return
        output = self.render()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(output)))
        self.end_headers()
        self.wfile.write(output)

    def _refused(self) -> None:
        self._plain(405, "method not allowed: GET only\n", ("Allow", "GET"))

    def _plain(self, status: int, text: str, *headers: tuple[str, str]) -> None:
        data = text.encode()
        self.send_response(status)
        for name, value in (("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data))),
                            *headers):
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":  # an answer to HEAD has no body, whatever its status
            self.wfile.write(data)

    def __getattr__(self, name: str) -> Any:
        """Every other method (HEAD, POST, PUT, DELETE, any word at all): 405 rather than http.server's 501.
        Contract §11 says GET only: Prometheus and node_exporter's scrapers send nothing else."""
        if name.startswith("do_"):
            return self._refused
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        """Not a line per scrape in the daemon's log."""


class Writer(threading.Thread):
    """Calls `write` once after each `wake`, in its own thread; wakes while it writes make one more write, not
    one each. A write that fails is reported (`report`, once per distinct error until one succeeds) and the next
    wake tries again."""

    def __init__(self, name: str, write: Callable[[], None], report: Callable[[str], object]) -> None:
        super().__init__(name=name, daemon=True)
        self.write, self.report = write, report
        self.woken = threading.Event()
        self.stopping = False  # the wake being handled is the last
        self.failing = ""  # the error the last write failed with

    def wake(self) -> None:
        self.woken.set()

    def run(self) -> None:
        while True:
            self.woken.wait()
            self.woken.clear()
            try:
                self.write()
                self.failing = ""
            except OSError as exc:
                said = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
                if said != self.failing:
                    self.report(said)
                self.failing = said
            if self.stopping:
                return

    def stop(self, timeout: float) -> None:
        """A last write (what changed since the one before is not lost), then the end; waits `timeout` seconds at
        most for it: a directory that hangs must not hold up a reload or the daemon's stop."""
        self.stopping = True
        self.woken.set()
        self.join(timeout)
