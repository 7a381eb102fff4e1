"""A deadline for a whole exchange on a socket. http.server and http.client apply a socket's timeout to each read,
which a peer sending a byte now and then (slowloris, or an endpoint trickling its answer) restarts for ever: at the
deadline the socket is shut down, and whatever read or write a thread is blocked in returns at once."""

from __future__ import annotations

import socket
import threading


def cut_off_after(sock: socket.socket, seconds: float) -> threading.Timer:
    """The timer, started: cancel it when the exchange is over in time."""
    timer = threading.Timer(max(seconds, 0.0), _shut, (sock,))
    timer.daemon = True
    timer.start()
    return timer


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed meanwhile: done in time after all
        pass
