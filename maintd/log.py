"""Structured logging: one structlog event per deploy step, rendered for journald, JSON lines or a terminal.

Every event may carry the audit fields of contract §5 (app, deploy_id, release, step, result, duration_ms, actor).
journald gets them as `MAINTD_*` fields; structlog ships no journald renderer and `journal.send` checks no field
names (journald silently drops lower-case ones), so the renderer here upper-cases and sanitises every key.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, TextIO

import structlog

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_NOT_FIELD = re.compile(r"[^A-Z0-9_]")
# Keys structlog adds that journald carries in its own fields.
_JOURNAL_OWN = {"event", "level", "timestamp"}


def journal_field(key: str) -> str:
    """`deploy_id` -> `MAINTD_DEPLOY_ID`: the only shape of name journald keeps."""
    return "MAINTD_" + _NOT_FIELD.sub("_", key.upper()).lstrip("_")


class JournalRenderer:
    """Final processor: send the event to journald and drop it from the stderr chain.

    A journald that is not there (restarting during an upgrade, or stale sockets of a stopped one) must not fail the
    deploy step that happened to log: the event goes on down the chain as a JSON line on stderr instead, with why,
    so it is kept wherever stderr goes rather than lost."""

    def __init__(self) -> None:
        from systemd import journal  # only the daemon under systemd pays for this import

        self._send = journal.send

    def __call__(self, _logger: Any, _name: str, event: dict[str, Any]) -> Any:
        fields = {journal_field(key): _text(value) for key, value in event.items()
                  if key not in _JOURNAL_OWN and value is not None}
        try:
            self._send(str(event.get("event", "")), PRIORITY=str(_PRIORITY.get(event.get("level", "info"), 6)),
                       SYSLOG_IDENTIFIER="maintd", **fields)
        except OSError as exc:
            return {**event, "journald": f"not reachable ({exc.strerror or exc}): logged here instead"}
        raise structlog.DropEvent


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def default_format(stream: TextIO = sys.stderr) -> str:
    """journald when stderr is the journal (systemd says so in JOURNAL_STREAM), else by whether a person watches."""
    journal_stream = os.environ.get("JOURNAL_STREAM", "")
    if journal_stream:
        try:
            info = os.fstat(stream.fileno())
            if journal_stream == f"{info.st_dev}:{info.st_ino}":
                return "journal"
        except (OSError, ValueError):
            pass
    return "console" if stream.isatty() else "json"


def configure(fmt: str | None = None, stream: TextIO = sys.stderr, level: int = logging.INFO) -> str:
    """Set up structlog for the whole process; returns the format chosen."""
    fmt = fmt or default_format(stream)
    renderers: list[Any]
    if fmt == "journal":
        renderers = [JournalRenderer(), structlog.processors.JSONRenderer(sort_keys=False)]
    elif fmt == "json":
        renderers = [structlog.processors.JSONRenderer(sort_keys=False)]
    else:
        renderers = [structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    return fmt


def get(**context: Any) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger().bind(**context)
    return logger
