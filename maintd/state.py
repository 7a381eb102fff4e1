"""What maintd remembers across restarts, in `state.dir`: one JSON object, and the history as JSON lines.

The persisted form is the `Memory` object itself, serialised: there is no second schema to drift from it. Writes
go to a temporary file that is fsynced and renamed, then the directory is fsynced, so a crash leaves the old state
or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .tree import fsync_dir


@dataclass
class ReleaseRecord:
    """What maintd knows of one release beyond what is on disk."""

    went_live: float | None = None  # last time it went live (seconds since the epoch)
    bad: str = ""  # why a deploy of it failed; a bad release is never deployed automatically again
    auto_considered: bool = False  # automatic deploys take a release at most once


@dataclass
class OperatorMaintenance:
    reason: str
    since: str
    by: str
    until: str = ""


@dataclass
class Memory:
    paused: bool = False
    maintenance: OperatorMaintenance | None = None
    previous: str | None = None
    last_deploy: dict[str, Any] | None = None
    releases: dict[str, ReleaseRecord] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Memory:
        maintenance = data.get("maintenance")
        return cls(
            paused=bool(data.get("paused", False)),
            maintenance=OperatorMaintenance(**maintenance) if maintenance else None,
            previous=data.get("previous"),
            last_deploy=data.get("last_deploy"),
            releases={name: ReleaseRecord(**record) for name, record in data.get("releases", {}).items()},
        )


class Store:
    """The state directory: `state.json` (a `Memory`) and `history.jsonl`, safe to use from several threads."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "state.json"
        self.history_path = directory / "history.jsonl"
        self.lock = threading.RLock()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.memory = Memory.from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            self.memory = Memory()

    def record(self, name: str) -> ReleaseRecord:
        with self.lock:
            return self.memory.releases.setdefault(name, ReleaseRecord())

    def save(self) -> None:
        with self.lock:
            write_durably(self.path, json.dumps(asdict(self.memory), indent=1, sort_keys=True))

    def append_history(self, entry: dict[str, Any]) -> None:
        with self.lock, open(self.history_path, "a", encoding="utf-8") as history:
            history.write(json.dumps(entry, sort_keys=True) + "\n")
            history.flush()
            os.fsync(history.fileno())

    def history(self) -> Iterator[dict[str, Any]]:
        """Past deploys, oldest first; a line cut by a crash is passed over."""
        try:
            lines = self.history_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def write_durably(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)
