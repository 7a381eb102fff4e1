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
# What of that output the message itself quotes, for the operator reading `journalctl -u` or `maintctl history`:
# its last lines, where a failing command says why (the whole of it stays in the log's `output` field)
TAIL_LINES, TAIL_CHARS = 3, 300


@dataclass(frozen=True)
class Ran:
    argv: tuple[str, ...]
    returncode: int | None  # None: killed at the time limit
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """One phrase for a log line: what failed and how, and the last lines it printed, which say why."""
        if self.returncode is None:
            how = "did not finish in time and was killed"
        elif self.returncode < 0:
            how = f"was killed by signal {-self.returncode}"
        else:
            how = f"exited with status {self.returncode}"
        said = self.tail()
        return f"{self.argv[0]} {how}" + (f": {said}" if said else "")

    def tail(self) -> str:
        """The last few non-blank lines of the output, joined with " | ", at most TAIL_CHARS long (cut at the front),
        with control characters escaped: a terminal's escape sequences or a stray carriage return from a hook must
        not rewrite the operator's screen or split the journal line."""
        lines = [line.strip() for line in self.output.splitlines() if line.strip()][-TAIL_LINES:]
        text = " | ".join("".join(_escaped(char) for char in line) for line in lines)
        return text if len(text) <= TAIL_CHARS else "…" + text[-(TAIL_CHARS - 1):]


def _escaped(char: str) -> str:
    """`char` itself, or its escape when it is a control character (C0, DEL or C1)."""
    code = ord(char)
    return char if 32 <= code < 127 or code >= 160 else f"\\x{code:02x}"


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
