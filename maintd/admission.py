"""Who may hold a connection to the control socket, and how many: the daemon's file descriptors are one budget.

The socket is mode 0666 (contract §5: any local user may read `status`), and every connection costs the daemon one
file descriptor for as long as it lasts. Unbounded, one user holding connections open runs the daemon out of
descriptors, and then nothing that needs one works: `accept()` for root, the walk of an upload, a deploy's hooks,
state writes. So connections are counted per uid and per pool, and one over its share is closed at once:

- a user outside `control.group` holds at most `PER_USER` connections, and all such users together `OTHERS`;
- root and members of `control.group` have a pool of their own (`TRUSTED`), which no other user's flood touches;
- both pools together take at most half of the daemon's descriptors: the other half is the deploy's reserve.

Refusals are counted and logged once per uid per `REFUSAL_WINDOW`, not once each: a flood must not become a flood of
log lines, which journald's rate limit would then drop, the audit trail with them.
"""

from __future__ import annotations

import asyncio
import pwd
import resource
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

# The soft limit maintd raises its own to, at most its hard limit (systemd gives services 1024 soft, 524288 hard).
# Not the hard limit itself: hooks and restart commands inherit it, and programs that size tables or loop over
# descriptors by it (select(), some JVMs and runtimes closing every possible descriptor before exec) pay for a huge
# one. 8192 is 16 times what every connection together may take, so the deploy keeps thousands.
FILE_LIMIT = 8192
# One user's connections: maintctl holds one per call, `deploy --follow` one per follower. 32 at once covers a
# user's scripts; eight users at their cap fill OTHERS, and still cannot reach root's pool.
PER_USER = 32
OTHERS = 256  # every user outside control.group together
TRUSTED = 256  # root and control.group together, uncapped per uid: they may change everything anyway
REFUSAL_WINDOW = 10.0  # seconds over which refusals of one uid are summed into one log line


def raise_file_limit() -> None:
    """Raise the soft limit on open files toward the hard limit, up to FILE_LIMIT (never lower it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FILE_LIMIT if hard == resource.RLIM_INFINITY else min(hard, FILE_LIMIT)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class Pool(Enum):
    TRUSTED = "root and control.group"
    OTHERS = "users outside control.group"


@dataclass(frozen=True)
class Limits:
    per_user: int
    others: int
    trusted: int

    @classmethod
    def for_files(cls, files: int) -> Limits:
        """The caps above, shrunk in proportion where the file limit is too low for them to take only half of it."""
        share = min(1.0, files / 2 / (OTHERS + TRUSTED))
        others, trusted = max(1, int(OTHERS * share)), max(1, int(TRUSTED * share))
        return cls(min(PER_USER, others), others, trusted)

    def of(self, pool: Pool) -> int:
        return self.trusted if pool is Pool.TRUSTED else self.others

    def describe(self) -> str:
        return (f"at most {self.per_user} connections per user, {self.others} for {Pool.OTHERS.value} together, "
                f"{self.trusted} for {Pool.TRUSTED.value}")


class TooMany(Exception):
    """One more connection would be over a cap; the message is what the peer is told."""


class Admission:
    """The connections held, per uid and per pool."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.held: Counter[int] = Counter()  # uid -> connections
        self.in_pool: Counter[Pool] = Counter()
        self.pool_of: dict[int, Pool] = {}  # while a uid holds any: so a flood is refused without a group lookup

    def take(self, uid: int, trusted: Callable[[], bool]) -> None:
        """Count one more connection of `uid`, or raise TooMany. `trusted` is asked only when the uid holds none."""
        pool = self.pool_of.get(uid) or (Pool.TRUSTED if trusted() else Pool.OTHERS)
        if pool is Pool.OTHERS and self.held[uid] >= self.limits.per_user:
            raise TooMany(f"too many connections: {self.limits.per_user} is the most one user outside "
                          "control.group may hold at once")
        if self.in_pool[pool] >= self.limits.of(pool):
            raise TooMany(f"too many connections: all {self.limits.of(pool)} for {pool.value} are taken")
        self.held[uid] += 1
        self.in_pool[pool] += 1
        self.pool_of[uid] = pool

    def give_back(self, uid: int) -> None:
        self.in_pool[self.pool_of[uid]] -= 1
        self.held[uid] -= 1
        if not self.held[uid]:
            del self.held[uid], self.pool_of[uid]


class RefusalLog:
    """Refusals summed per uid: one line per uid per window, however many connections were refused in it."""

    def __init__(self, logger: FilteringBoundLogger, window: float = REFUSAL_WINDOW) -> None:
        self.log = logger
        self.window = window
        self.counts: Counter[int] = Counter()
        self.reasons: dict[int, str] = {}
        self.since = 0.0  # loop time of the window's first refusal
        self._timer: asyncio.TimerHandle | None = None

    def count(self, uid: int, reason: str) -> None:
        if not self.counts:
            loop = asyncio.get_running_loop()
            self.since = loop.time()
            self._timer = loop.call_later(self.window, self.flush)
        self.counts[uid] += 1
        self.reasons[uid] = reason

    def flush(self) -> None:
        """Log the window's refusals: when it ends, or earlier when the daemon stops."""
        if self._timer:
            self._timer.cancel()
            self._timer = None
        if not self.counts:
            return
        seconds = round(asyncio.get_running_loop().time() - self.since, 1)
        for uid, refused in self.counts.items():
            self.log.warning(f"refused {refused} connection{'s' if refused > 1 else ''} from uid {uid} "
                             f"({user_name(uid)}) in the last {seconds:g} s: {self.reasons[uid]}",
                             uid=uid, refused=refused)
        self.counts.clear()
        self.reasons.clear()


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"
