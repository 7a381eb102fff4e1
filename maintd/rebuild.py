"""Rebuilding what maintd remembers when `state.json` is lost (empty, not JSON, the wrong shape: a failing disk, a hand
edit), so that the daemon carries on instead of stopping with a traceback, restarted by systemd every 2 s.

Most of it can be known again:
- from `history.jsonl`, replayed as the deploys wrote it: when each release went live (by the end of its last deploy
  that went live), the previous release, the last deploy, and the bad releases (those whose last deploy failed or
  rolled back through their own fault: never taken live automatically again);
- from the tree: the live release (when `current` was last replaced, if the history does not say), and an
  operator's maintenance: a flag up in the live release while no deploy was in flight is taken as the operator's,
  with the reason its body gives, and held until `maintctl maintenance off`.
Whether automatic deploys were paused cannot be known: the state is rebuilt paused, so that nothing goes live by
itself until an operator has looked and said `maintctl resume`.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .maintenance import Flags, Notice
from .results import StepResult
from .state import Memory, ReleaseRecord, Store
from .steps import Fault
from .tree import Tree, name_problem

NAMED = 10  # bad releases named in the log line; the rest are counted


def rebuild(store: Store, tree: Tree, flags: Flags) -> str:
    """Replace the store's memory (blank and paused: `Store` found state.json damaged) with what the history and the
    tree say, and save it; returns the one log line: the fault, what was rebuilt and what could not be."""
    memory = Memory(paused=True)
    try:
        from_history = _from_history(memory, store.history(), store.history_path.name)
    except OSError as exc:
        from_history = f"nothing from {store.history_path.name}, which cannot be read ({exc.strerror})"
    from_tree = _from_tree(memory, store, tree, flags)
    with store.lock:
        store.memory = memory
        try:
            store.save()
            saved = ""
        except OSError as exc:
            saved = f" It could not be saved ({exc.strerror}): it is rebuilt again at the next start."
    return (f"{store.damage}. Rebuilt {from_history}; {from_tree}. Not known: whether automatic deploys were "
            f"paused; they are paused until `maintctl resume`.{saved}")


def _from_history(memory: Memory, entries: list[dict[str, Any]], source: str) -> str:
    """Every entry replayed into the memory; says what was found."""
    replayed, latest = 0, 0.0
    for entry in entries:
        if (moved := _replay(memory, entry, latest)) is not None:
            replayed, latest = replayed + 1, moved
    went_live = sum(record.went_live is not None for record in memory.releases.values())
    bad = sorted(name for name, record in memory.releases.items() if record.bad)
    last = memory.last_deploy
    passed_over = len(entries) - replayed
    return (f"from {source} ({replayed} deploy(s)"
            + (f"; {passed_over} entry(ies) of the wrong shape passed over" if passed_over else "") + "): "
            f"when {went_live} release(s) went live, the previous release ({memory.previous or 'none'}), "
            "the last deploy (" + (f"{last['release']} {last['result']}" if last else "none") + "), "
            f"{len(bad)} bad release(s)" + (f" ({', '.join(bad[:NAMED])}{', ...' if len(bad) > NAMED else ''})"
                                             if bad else ""))


def _replay(memory: Memory, entry: dict[str, Any], latest: float) -> float | None:
    """One history entry into the memory, as the deploy that wrote it left the state; returns the latest time a
    release went live so far, or None for an entry of the wrong shape (passed over).

    The history keeps start times to the second: its order, which is the deploys', decides between two deploys
    that went live within one second (cleanup removes releases in the order they went live)."""
    release, result = entry.get("release"), entry.get("result")
    if not isinstance(release, str) or name_problem(release) or result not in set(StepResult):
        return None
    record = memory.releases.setdefault(release, ReleaseRecord())
    record.auto_considered = True  # automatic deploys take a release at most once
    finished = _finished(entry)
    if result == StepResult.OK:
        latest = max(finished or 0.0, latest + 0.001)
        record.went_live = latest
        previous = entry.get("previous")
        memory.went_live(release, previous if isinstance(previous, str) else None)
    else:  # as the deploy judged it: by whose fault the failure was (the release's, where an old entry does not say)
        fault = entry.get("fault")
        record.judge(Fault(fault) if fault in tuple(Fault) else Fault.RELEASE,
                     str(entry.get("error") or f"its {entry.get('kind') or 'deploy'} {result}"))
    memory.last_deploy = {key: value for key, value in entry.items() if key != "steps"}
    if finished is not None:
        memory.last_deploy["finished"] = datetime.fromtimestamp(finished, UTC).isoformat(timespec="seconds")
    return latest


def _finished(entry: dict[str, Any]) -> float | None:
    """When a deploy ended (seconds since the epoch): its start and duration, as the history keeps them."""
    try:
        return datetime.fromisoformat(entry["started"]).timestamp() + float(entry["duration_ms"]) / 1000
    except (KeyError, TypeError, ValueError):
        return None


def _from_tree(memory: Memory, store: Store, tree: Tree, flags: Flags) -> str:
    """The live release, and an operator's maintenance from its flag; says what was found."""
    live = tree.live()
    if not live:
        return "from the tree: no release is live"
    record = memory.releases.setdefault(live, ReleaseRecord())
    record.auto_considered = True
    if record.went_live is None:  # live since before the history begins: since `current` was last replaced
        record.went_live = os.lstat(tree.current).st_mtime
    found = f"from the tree: the live release ({live})"
    flag = flags.paths(tree.releases / live)[0]
    if not flags.is_up(tree.releases / live):
        return found
    if store.in_flight() is not None:
        return found + ", whose maintenance flag is the deploy's in flight (recovery lowers it)"
    memory.maintenance = _notice(flag)
    return found + f" and the operator's maintenance its flag shows ({memory.maintenance.reason})"


def _notice(flag: Path) -> Notice:
    """The notice a flag's body gives (`Notice.body`: `reason: ...` lines); what it lacks is said as unknown."""
    try:
        text = flag.read_text(encoding="utf-8")
        since = datetime.fromtimestamp(os.stat(flag).st_mtime, UTC).isoformat(timespec="seconds")
    except (OSError, UnicodeDecodeError):
        text, since = "", ""
    said = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}
    return Notice(reason=said.get("reason") or "maintenance flag found up when the state was rebuilt",
                  since=said.get("since") or since, by=said.get("by") or "unknown", until=said.get("until", ""))
