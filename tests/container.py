"""systemd as PID 1 in a container (systemd-nspawn -b), for the tests that need a real systemd: the units
(test_systemd.py) and the Debian package (test_package.py). A script of tests/nspawn/ runs as a unit that powers
the container off when it is done, recording KEY=VALUE lines in /results/steps for the test to assert on."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest


def read(path: Path) -> str:
    """A file the container may not have written (it failed before): empty then."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def boot(root: str, results: Path, unit: str, options: list[str], timeout: float) -> tuple[dict[str, str], str]:
    """Boots `root` (with `options`: its volatility, its binds, /results among them) until `unit` powers it off.
    Returns the steps the script recorded and the context for assertion messages (steps, the script's log and
    the journal's tail). Skips where this machine refuses the namespaces nspawn needs."""
    try:
        booted = subprocess.run(["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", root, *options, "-b",
                                 "systemd.firstboot=no", "systemd.unit=multi-user.target", f"systemd.wants={unit}"],
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the container did not power off; its script's log:\n{read(results / 'check.log')}")
    refused = re.search(r"Operation not permitted|namespace", booted.stderr + booted.stdout)
    if not (results / "steps").exists() and refused:
        pytest.skip(f"this machine refuses the namespaces systemd-nspawn needs: {booted.stderr[-300:]}")
    steps = dict(line.split("=", 1) for line in read(results / "steps").splitlines() if "=" in line)
    context = (f"steps: {json.dumps(steps, indent=1)}\nnspawn: {booted.stderr[-1500:]}\nscript's log: "
               f"{read(results / 'check.log')[-2000:]}\njournal:\n{read(results / 'journal.txt')[-4000:]}")
    return steps, context
