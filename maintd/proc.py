"""Running an operator's command (a hook, a restart command) with a time limit and its output kept for the log."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runas import RunAs

OUTPUT_LIMIT = 8192  # bytes of output kept for the log: the end, where errors are


@dataclass(frozen=True)
class Ran:
    argv: tuple[str, ...]
    returncode: int | None  # None: killed at the time limit
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """One phrase for a log line: what failed and how."""
        if self.returncode is None:
            return f"{self.argv[0]} did not finish in time and was killed"
        if self.returncode < 0:
            return f"{self.argv[0]} was killed by signal {-self.returncode}"
        return f"{self.argv[0]} exited with status {self.returncode}"


def run(argv: tuple[str, ...], cwd: Path, timeout: float, env: dict[str, str] | None = None,
        runas: RunAs | None = None) -> Ran:
    """Run `argv` in its own process group, so that at the time limit everything it started is killed too.

    With `runas`, as that user and with only the environment it gives (hooks, restart commands: code that came
    with an upload); without, as the daemon with its environment plus `env` (maintd's own tools)."""
    environment = runas.environment(env or {}) if runas else {**os.environ, **(env or {})}
    try:
        child = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=environment,
                                 **(runas.popen_args() if runas else {}))
    except (OSError, subprocess.SubprocessError) as exc:
        return Ran(argv, 127, f"cannot run {argv[0]}: {getattr(exc, 'strerror', None) or exc}")
    try:
        output, _ = child.communicate(timeout=timeout)
        returncode: int | None = child.returncode
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        returncode = None
    return Ran(argv, returncode, output[-OUTPUT_LIMIT:].decode("utf-8", "replace"))
