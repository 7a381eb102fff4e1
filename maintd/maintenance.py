"""The maintenance flag the web server checks, and the page it serves while the flag exists.

The flag is a file inside a release (`maintenance.file`, seen by the web server through `current`). Writing it into
both the live and the incoming release before the swap keeps maintenance on across the swap with no gap. All files
are made aside and renamed into place, so the web server never reads half a page. The release is the uploader's:
its directories are walked confined (see confined.py), so a `tmp` that is a symlink out of the app's tree refuses
the flag before anything is made, and what is made is the release owner's.

When `--until` names an instant, the web server's Retry-After says it as an HTTP date, which stays right however long
the page is shown: Apache reads it from `maintenance.retry-after` beside the page, and nginx, which cannot read a
file into a header without a module nginx-light lacks, sends the page's own mtime, set to that instant.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from email.utils import format_datetime
from importlib import resources
from pathlib import Path

from .confined import Confined, PathRefused

PAGE_NAME = "maintenance.html"
RETRY_AFTER_NAME = "maintenance.retry-after"
BESIDE_FLAG = (PAGE_NAME, RETRY_AFTER_NAME)  # what maintd writes next to the flag, by these names


@dataclass(frozen=True)
class Notice:
    """Why the site is down, since when and by whom: the flag's body, the page's text, and (remembered in the state)
    an operator's maintenance."""

    reason: str
    since: str
    by: str
    until: str = ""

    def body(self) -> str:
        lines = [f"reason: {self.reason}", f"since: {self.since}", f"by: {self.by}"]
        if self.until:
            lines.append(f"until: {self.until}")
        return "\n".join(lines) + "\n"

    def end(self, now: datetime) -> datetime | None:
        """The instant `until` names on this host's clock, reckoned from when the maintenance began, if it is still to
        come: one already past would tell every client to come back at once."""
        try:
            since = datetime.fromisoformat(self.since).astimezone()
        except ValueError:
            since = now.astimezone()
        end = expected_end(self.until, since)
        return end if end and end > now else None


def expected_end(until: str, since: datetime) -> datetime | None:
    """What `--until` names: a time of day ("22:00", "07:30:15") is the first such time after `since`, in since's
    time zone unless it names one; an ISO 8601 date and time is itself (in since's zone when it names none). Any
    other text names no instant: the page shows it, and Retry-After stays at its default."""
    text = until.strip()
    try:
        clock = time.fromisoformat(text)
    except ValueError:
        pass
    else:
        zone = clock.tzinfo or since.tzinfo
        day = datetime.combine(since.astimezone(zone).date(), clock.replace(tzinfo=None), zone)
        return day if day > since else day + timedelta(days=1)
    try:
        end = datetime.fromisoformat(text)
    except ValueError:
        return None
    return end if end.tzinfo else end.replace(tzinfo=since.tzinfo)


def default_template() -> str:
    return resources.files("maintd").joinpath(PAGE_NAME).read_text(encoding="utf-8")


def render(template: str, notice: Notice) -> str:
    """Fill the page's `{{reason}}` and `{{until}}`, escaped: the reason comes from an operator's command line."""
    until = f"Expected back by {notice.until}." if notice.until else ""
    return template.replace("{{reason}}", html.escape(notice.reason)).replace("{{until}}", html.escape(until))


class Flags:
    """Puts the flag and its page into release directories, and the flag away again."""

    def __init__(self, flag: str, template: str, root: Path) -> None:
        self.flag = flag
        self.template = template
        self.root = root  # the app's tree, which the flag's directory must not lead out of
        self._dir, self._name = os.path.split(os.path.normpath(flag))

    def paths(self, release: Path) -> tuple[Path, Path]:
        flag = release / self.flag
        return flag, flag.parent / PAGE_NAME

    def raise_in(self, release: Path, notice: Notice) -> None:
        """Write the page first, then the flag, so the flag never points the web server at a missing page. With an
        expected end, the page is dated at it and `maintenance.retry-after` written after the page; without one, that
        file goes before the page: whenever it exists, the page's date is an end (nginx trusts it on its word)."""
        end = notice.end(datetime.now(UTC))
        with Confined.open(self.root, release) as top, top.dir(self._dir, create=True) as where:
            if end is None:
                where.unlink(RETRY_AFTER_NAME)
            where.write(PAGE_NAME, render(self.template, notice), mtime_ns=int(end.timestamp() * 1e9) if end else None)
            if end is not None:
                where.write(RETRY_AFTER_NAME, format_datetime(end.astimezone(UTC), usegmt=True))
            where.write(self._name, notice.body())

    def lower_in(self, release: Path) -> None:
        """Remove the flag: from that instant the site is back. The page (and its Retry-After) stays: a request that
        saw the flag an instant earlier is still on its way to the page (Apache answered its own 503 "ErrorDocument"
        error when the page went with the flag), and the next maintenance writes it afresh. Where the flag's directory
        is missing or leads out of the tree, no flag of maintd's can be: `raise_in` never makes one there."""
        try:
            with Confined.open(self.root, release) as top, top.dir(self._dir) as where:
                where.unlink(self._name)
        except (FileNotFoundError, NotADirectoryError, PathRefused):
            pass

    def is_up(self, release: Path) -> bool:
        try:
            with Confined.open(self.root, release) as top, top.dir(self._dir) as where:
                return where.kind(self._name) is not None
        except (FileNotFoundError, NotADirectoryError, PathRefused):
            return False
