"""`make demo` as a newcomer runs it: the whole job, shown as a visitor and an operator see it, then nothing left."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import have, wait_until

DEMO = Path(__file__).parent.parent / "scripts" / "demo.py"


def running_in(path: str) -> list[str]:
    """Command lines of the processes that name `path` (what the demo started, if any were left)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmdline:
            found.append(cmdline)
    return found


def run_demo() -> str:
    done = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


needs_web = pytest.mark.skipif(not (have("nginx") and have("puma")),
                               reason="nginx or puma is missing (`make test` installs them)")


@needs_web
def test_the_demo_shows_old_page_new_for_every_deploy_and_leaves_nothing_behind():
    out = run_demo()
    phases = out.split("\n\x1b[1m== ")
    timelines = {phase.splitlines()[0]: re.findall(r"visitor +\+ *[\d.]+s +(\d+) +(.*?) +\(×\d+\)", phase)
                 for phase in phases if phase.strip()}
    deploys = {title: lines for title, lines in timelines.items()
               if title.startswith(("upload 2", "upload 3", "a rollback"))}
    assert len(deploys) == 3
    for title, lines in deploys.items():
        statuses = [status for status, _ in lines]
        assert statuses == ["200", "503", "200"], (title, lines)  # old release, the page, the new one: nothing else
        assert lines[0][1] != lines[2][1] and lines[1][1].startswith("maintenance page: deploying release")
    [operator] = [lines for title, lines in timelines.items() if title.startswith("operator maintenance")]
    assert [status for status, _ in operator] == ["200", "503", "200"]
    assert operator[1][1] == "maintenance page: database upgrade"
    assert "current      20261126110000" in out and "KIND    RELEASE" in out
    assert re.search(r"maintd\[\d+\]: swap: current -> releases/20261126100000", out)  # the rollback's audit trail
    assert "each got a release or the maintenance page" in out
    base = re.search(r'socket = "(/tmp/maintd-demo-[^/]+)/', out).group(1)
    assert not Path(base).exists()
    wait_until(lambda: not running_in(base), 10, "the demo's processes to be gone")


@needs_web
def test_with_journald_running_the_audit_trail_is_journalctls(journald):
    out = run_demo()
    assert "journald is not running here" not in out
    assert re.search(r"\+0000 \S+ maintd\[\d+\]: swap: current -> releases/20261126100000", out), out
