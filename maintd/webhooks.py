"""Contract §11's notifications: every event (events.py) POSTed to each of `[notify] webhooks` as it happens.

A webhook is someone else's server, which may be slow, down, or accept and never answer. None of that may reach a
deploy: `Webhooks.__call__`, the listener, only puts the event on each endpoint's queue and returns, and each
endpoint has a thread of its own that POSTs. One thread per endpoint rather than one for all: an endpoint must get
its events in the order they happened, so its POSTs go one after the other, and one that hangs for its timeout on
every attempt must hold up only itself (one sender for all would wait on the slowest). Endpoints are few (a team's
channel, an incident tool); an idle thread waits on its queue without waking.

A URL's secret (Slack's path tokens, a query string, user:password@) never leaves this module: logs and `status`
name an endpoint by its place in the list and `Webhook.shown` (scheme://host/…), and a failure is described by its
kind (`_why`), never by an exception's text, which may quote the URL.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import queue
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from . import log
from .config import Notify, Webhook, WebhookFormat
from .deadline import cut_off_after
from .events import NOTIFIED, Event, Happening, Listener

QUEUE_SIZE = 100  # events waiting per endpoint; past it the newest are dropped (said once per burst)
BACKOFF = (1.0, 2.0, 4.0)  # seconds before each of the 3 retries of a failed POST: rides out a blip of some 7 s
# At stop, what is queued gets this long to go out (no retries then): enough for a healthy endpoint, which answers in
# milliseconds, to take the last deploy's events; short enough that a dead one costs a restart (an upgrade, a
# reboot) next to nothing. The POST in flight then is abandoned with the process (the threads are daemons).
STOP_GRACE = 2.0
SLACK_LINE_MAX = 500  # characters of the slack format's line: an error may be a hook's whole output


class NotDelivered(Exception):
    """An endpoint that answered, but not with 2xx."""


class Endpoint:
    """One webhook: its queue, its thread, and what became of its POSTs (for `status`)."""

    def __init__(self, hook: Webhook, number: int, timeout: float, app: str) -> None:
        self.hook, self.number, self.timeout = hook, number, timeout
        self.log = log.get(app=app)
        self.queue: queue.Queue[Event | None] = queue.Queue()  # bounded by `offer`, so that `close` always fits
        self.lock = threading.Lock()  # `offer` is called from the loop and from deploys' threads
        self.dropping = False  # a burst of events dropped for a full queue, said once
        self.stopping = threading.Event()
        self.deadline = float("inf")  # monotonic: no POST begins after it
        self.sent = self.dropped = 0
        self.pending = 0  # offered and neither sent nor dropped yet: what a stop leaves unsent
        self.last_failure: dict[str, str] | None = None
        self.thread = threading.Thread(target=self._run, name=f"webhook {number}", daemon=True)
        self.thread.start()

    @property
    def name(self) -> str:
        return f"webhook {self.number} ({self.hook.shown})"

    def offer(self, event: Event) -> None:
        with self.lock:
            if self.pending < QUEUE_SIZE:
                self.queue.put(event)
                self.pending += 1
                self.dropping = False
                return
            self.dropped += 1
            if self.dropping:
                return
            self.dropping = True
        self.log.warning(f"{self.name}: {QUEUE_SIZE} events wait already; dropping new ones until it takes them "
                         f"(the first: {event.event})", webhook=self.hook.shown)

    def close(self, deadline: float) -> None:
        """Send what is queued until `deadline`, without retries, then end."""
        self.deadline = deadline
        self.stopping.set()
        self.queue.put(None)

    def _run(self) -> None:
        while (event := self.queue.get()) is not None and self._deliver(event):
            pass

    def _deliver(self, event: Event) -> bool:
        """One event, tried once and then after each pause of BACKOFF; dropped with one line if none went through.
        False if the deadline of a stop came before it was tried: it is left to the stop's count."""
        body = BODIES[self.hook.format](event)
        why, attempts = "", 0
        for pause in (0.0, *BACKOFF):
            if pause and self.stopping.wait(pause):
                break  # stopping: the rest of the queue gets the time left
            if (left := self.deadline - time.monotonic()) <= 0:
                break
            attempts += 1
            try:
                post(self.hook.url, body, min(self.timeout, left))
            # ValueError: what the lookup raises for a host name IDNA refuses (UnicodeError), rather than an OSError
            except (OSError, http.client.HTTPException, NotDelivered, ValueError) as exc:
                why = _why(exc)
                continue
            self._done(sent=True)
            return True
        if not attempts:
            return False
        self._done(sent=False)
        self.last_failure = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "error": why,
                             "event": str(event.event)}
        self.log.warning(f"{self.name}: {event.event} event dropped after {attempts} attempt"
                         f"{'' if attempts == 1 else 's'}: {why}", webhook=self.hook.shown,
                         release=event.release or None, deploy_id=event.deploy_id or None)
        return True

    def _done(self, sent: bool) -> None:
        with self.lock:
            self.pending -= 1
            if sent:
                self.sent += 1
            else:
                self.dropped += 1

    def status(self) -> dict[str, Any]:
        return {"url": self.hook.shown, "format": str(self.hook.format), "sent": self.sent, "dropped": self.dropped,
                "waiting": self.pending, "last_failure": self.last_failure}


class Webhooks:
    """The endpoints of `[notify]`, the same across reloads: a reload keeps the thread and queue of an endpoint it
    still lists (what waits there is still sent), starts the new ones and ends the ones it no longer lists, dropping
    what waits for them (an operator who removes an endpoint wants no more of it)."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.log = log.get(app=app)
        self.endpoints: dict[Webhook, Endpoint] = {}  # replaced whole: `__call__` walks it from other threads

    def configure(self, notify: Notify) -> None:
        old, endpoints = dict(self.endpoints), {}
        for number, hook in enumerate(notify.webhooks, start=1):
            endpoint = old.pop(hook, None) or Endpoint(hook, number, notify.timeout, self.app)
            endpoint.number, endpoint.timeout = number, notify.timeout
            endpoints[hook] = endpoint
        self.endpoints = endpoints
        for endpoint in old.values():
            if waiting := endpoint.pending:
                self.log.warning(f"{endpoint.name} is no longer configured: {waiting} events not sent",
                                 webhook=endpoint.hook.shown)
            endpoint.close(time.monotonic())

    def listeners(self) -> tuple[Listener, ...]:
        return (self,) if self.endpoints else ()

    def __call__(self, event: Event) -> None:
        if event.event not in NOTIFIED:
            return
        for endpoint in self.endpoints.values():
            endpoint.offer(event)

    def stop(self) -> None:
        """What is queued gets STOP_GRACE to go out (every endpoint at once); what is left then is said, and lost."""
        deadline = time.monotonic() + STOP_GRACE
        for endpoint in self.endpoints.values():
            endpoint.close(deadline)
        for endpoint in self.endpoints.values():
            endpoint.thread.join(max(0.0, deadline - time.monotonic()))
            if left := endpoint.pending:
                self.log.warning(f"{endpoint.name}: {left} events not sent: maintd stopped",
                                 webhook=endpoint.hook.shown)

    def status(self) -> list[dict[str, Any]]:
        return [endpoint.status() for endpoint in self.endpoints.values()]


# --- the POST -----------------------------------------------------------------------------------------------------


@functools.cache
def _tls() -> ssl.SSLContext:
    """The default context (system CAs, hostname checked), made once: loading the CAs takes a while."""
    return ssl.create_default_context()


def post(url: str, body: bytes, timeout: float) -> None:
    """POST `body` as JSON; returns on 2xx. `timeout` bounds the exchange: the connection (and a TLS handshake) as
    each of its reads, then the request and the answer's head together, the socket shut at the deadline
    (deadline.py: http.client's timeout bounds each read, not the answer). Redirects are not followed (a 3xx is a
    failure): urllib would follow one with a GET and no body."""
    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout
    host, port = parts.hostname or "", parts.port
    connection = (http.client.HTTPSConnection(host, port, timeout=timeout, context=_tls()) if parts.scheme == "https"
                  else http.client.HTTPConnection(host, port, timeout=timeout))
    headers = {"Content-Type": "application/json", "User-Agent": "maintd"}
    if parts.username is not None:  # user:password@ is Basic authentication
        credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    cut: threading.Timer | None = None
    try:
        connection.connect()
        assert connection.sock is not None
        cut = cut_off_after(connection.sock, deadline - time.monotonic())
        connection.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, headers)
        answer = connection.getresponse()
        if not 200 <= answer.status < 300:
            raise NotDelivered(f"answered {answer.status} {answer.reason[:80]}".rstrip())
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline:  # the timer's shutdown, said in http.client's words: a closed connection
            raise TimeoutError("no answer within the timeout") from exc
        raise
    finally:
        if cut is not None:
            cut.cancel()
        connection.close()


def _why(exc: Exception) -> str:
    """A failure in words that cannot hold the URL: its kind, and the system's or the endpoint's reason."""
    if isinstance(exc, NotDelivered):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "no answer within the timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or 'failed'}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, UnicodeError):
        return "not a host name a lookup takes"
    return type(exc).__name__  # http.client's: RemoteDisconnected, BadStatusLine, ...


# --- the bodies ---------------------------------------------------------------------------------------------------


def json_body(event: Event) -> bytes:
    return json.dumps(event.fields()).encode()


def slack_body(event: Event) -> bytes:
    """{"text": one line}: what Slack's incoming webhooks take, and Mattermost's and Rocket.Chat's. &, < and > are
    escaped as Slack's text asks (unescaped they start its links and mentions)."""
    text = re.sub(r"\s+", " ", slack_line(event)).strip()
    if len(text) > SLACK_LINE_MAX:
        text = text[:SLACK_LINE_MAX - 1] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return json.dumps({"text": text}).encode()


def slack_line(e: Event) -> str:
    """e.g. "shop: deploy of r42 by alice failed at restart: exit 1"."""
    said = {
        Happening.DEPLOY_STARTED: f"deploy of {e.release} by {e.actor} started",
        Happening.DEPLOY_FINISHED: f"{e.outcome.kind if e.outcome else 'deploy'} of {e.release} by {e.actor} "
                                   + ("went live" if e.result == "ok" else str(e.result).replace("_", " "))
                                   + (f" at {e.step}" if e.step else ""),
        Happening.MAINTENANCE_ON: f"maintenance on by {e.actor}",
        Happening.MAINTENANCE_OFF: f"maintenance off by {e.actor}",
        Happening.UPLOAD_REFUSED: f"upload {e.release} refused",
        Happening.SWITCH_ABORTED: f"cluster switch to {e.release} aborted by {e.actor}",
    }[e.event]
    error = e.error.removeprefix(f"{e.step}: ") if e.step else e.error  # a deploy's error starts with its step
    return f"{e.app}: {said}" + (f": {error}" if error else "")


BODIES: dict[WebhookFormat, Callable[[Event], bytes]] = {WebhookFormat.JSON: json_body,
                                                         WebhookFormat.SLACK: slack_body}
