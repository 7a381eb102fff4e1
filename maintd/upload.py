"""When an upload is complete (contract §1), as a state machine fed with events and probes, never with threads.

The watcher reports what inotify saw; the daemon walks a release (`Tree.probe`) when the tracker says it is due.
The tracker decides. Its rules, in order:

- the marker at the top of the release means complete, at once;
- with `require_marker`, nothing else does;
- an rsync temporary file deleted instead of renamed means the upload broke off: the release waits for the marker
  or for new writes (which clear the break) followed by quiet;
- otherwise complete once nothing under the release changed for the quiet period (newest ctime under the release,
  which an uploader cannot set, and the last event seen) and no rsync temporary file is left.

Time is passed in (seconds since the epoch, the clock ctime uses), so tests drive it without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .tree import Probe

STILL_CHANGING = "still changing"
UNGUARDED = ("no marker or manifest: a cut scp, or rsync with --partial, --inplace or --temp-dir, would look as "
             "complete as this once quiet")


class Verdict(Enum):
    COMPLETE = "complete"
    WAIT = "wait"  # not yet; `Upload.due` says when to look again (None: only after another event)


@dataclass
class Upload:
    """One release being uploaded."""

    name: str
    last_event: float
    broken: bool = False
    due: float | None = None
    reasons: list[str] = field(default_factory=list)  # why it is still waiting, for `maintctl releases`


class UploadTracker:
    """Every release in `releases/` whose upload is not known to be complete."""

    def __init__(self, quiet_period: float, require_marker: bool) -> None:
        self.quiet_period = quiet_period
        self.require_marker = require_marker
        self.uploads: dict[str, Upload] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.uploads

    def activity(self, name: str, now: float) -> None:
        """Something under the release changed: the quiet period starts again, and a broken upload resumed."""
        upload = self.uploads.setdefault(name, Upload(name, now))
        if not upload.reasons and not self.require_marker:  # until the first look says more
            upload.reasons = [STILL_CHANGING, UNGUARDED]
        upload.last_event = now
        upload.broken = False
        upload.due = None if self.require_marker else now + self.quiet_period

    def broke_off(self, name: str, now: float) -> bool:
        """An rsync temporary file was deleted, not renamed: the sender died and the rest never came.

        True when this is news (the upload was not already known to be broken), so the break is logged once."""
        news = name not in self.uploads or not self.uploads[name].broken
        self.activity(name, now)
        upload = self.uploads[name]
        upload.broken = True
        upload.due = None
        return news

    def doubt(self, now: float) -> None:
        """Events were lost (inotify overflow): a break may have gone unseen, so every upload waits for more."""
        for name in list(self.uploads):
            self.broke_off(name, now)

    def marker_seen(self, name: str, now: float) -> None:
        """The marker appeared: look at once."""
        self.activity(name, now)
        self.uploads[name].due = now

    def look_again(self, name: str, at: float, reason: str) -> bool:
        """A look at the release failed for a reason that passes (EMFILE, EIO): it is due again `at`, whatever
        it was waiting for. True when the reason is news, so a failure that lasts is logged once."""
        upload = self.uploads.setdefault(name, Upload(name, at))
        news = upload.reasons != [reason]
        upload.reasons = [reason]
        upload.due = at
        return news

    def forget(self, name: str) -> None:
        self.uploads.pop(name, None)

    def take_due(self, now: float) -> list[str]:
        """Uploads whose time to be looked at has come; their timers stop until `judge` re-arms them."""
        due = [u for u in self.uploads.values() if u.due is not None and u.due <= now]
        for upload in due:
            upload.due = None
        return [u.name for u in due]

    def next_due(self) -> float | None:
        return min((u.due for u in self.uploads.values() if u.due is not None), default=None)

    def judge(self, name: str, probe: Probe, has_marker: bool, now: float, has_manifest: bool = False) -> Verdict:
        """Decide from a fresh probe whether the upload is complete; re-arms the timer when it is not. Without a
        marker or a manifest, the reasons say what the quiet period cannot tell apart."""
        upload = self.uploads.setdefault(name, Upload(name, now))
        upload.due = None
        if has_marker:
            return Verdict.COMPLETE
        if self.require_marker:
            upload.reasons = ["waiting for the marker (upload.require_marker)"]
            return Verdict.WAIT
        if upload.broken:
            upload.reasons = ["the upload broke off (an rsync temporary file was deleted); waiting for new writes"]
            return Verdict.WAIT
        last = max(probe.last_change, upload.last_event)
        if now - last < self.quiet_period:
            upload.reasons = [STILL_CHANGING] + ([] if has_manifest else [UNGUARDED])
            upload.due = last + self.quiet_period
            return Verdict.WAIT
        if probe.temp_files:
            upload.reasons = [f"rsync temporary file left: {probe.temp_files[0]}"]
            return Verdict.WAIT
        return Verdict.COMPLETE
