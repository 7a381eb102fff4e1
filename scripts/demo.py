"""make demo: the whole job as the users see it, on a throw-away tree, in under a minute.

nginx (with maintd's shipped snippets) in front of Puma serving a tiny Rack app from `current`, memcached, and
maintd on the tree. A visitor's request loop runs throughout; each phase prints what the visitor got, as a compact
timeline: 200 from the old release, the 503 maintenance page with its reason, 200 from the new one, nothing else.
Then what an operator does: status, history, maintenance on and off, a rollback, and the audit trail as journalctl
shows it (from journald when it runs here, else maintd's JSON log filtered the same way). Everything it starts is
stopped by pid and its directory removed at the end. The web stack is the tests' own (tests/test_web.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent)]

from test_web import CONFIG_RU, NginxPuma, get  # noqa: E402

from conftest import BIN, App, Memcached, journald_listens, wait_until  # noqa: E402

REASON = re.compile(r'id="reason">([^<]*)<')


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


class Visitor:
    """Requests one after another, all demo long, as a visitor from another host sees them (127.0.0.2)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[tuple[float, str]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            status, body, _ = get(self.port)
            if status == 200:
                what = f"200  {body.strip()}"
            elif status == 503 and (reason := REASON.search(body)):
                what = f"503  maintenance page: {reason.group(1)}"
            else:
                what = f"{status}  {body.strip()[:60]}"
            self.seen.append((time.monotonic(), what))
            self.stopping.wait(0.01)

    @contextmanager
    def timeline(self) -> Iterator[None]:
        """What the visitor got while the block ran and in its next few answers, runs of the same answer folded."""
        start = time.monotonic()
        yield
        self.wait_for(lambda seen: len(seen) >= 10, since=time.monotonic())
        runs: list[list] = []
        for when, what in [s for s in self.seen if s[0] >= start]:
            if runs and runs[-1][1] == what:
                runs[-1][2] += 1
            else:
                runs.append([when - start, what, 1])
        for offset, what, count in runs:
            print(f"   visitor  +{offset:5.2f}s  {what}  (×{count})")

    def wait_for(self, enough: Callable[[list[str]], bool], since: float) -> None:
        """Until the answers seen since `since` are `enough`."""
        wait_until(lambda: enough([what for when, what in list(self.seen) if when >= since]), 20, "the visitor")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)


class Demo:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.memcached = Memcached()
        self.app = App(base, self.memcached.address)
        self.upload = base / "upload"
        self.procs: list[subprocess.Popen] = []

    def release(self, name: str, marker: bool) -> None:
        """Build a release of the tiny app and rsync it into releases/, as an uploader would."""
        src = self.upload / name
        (src / "public").mkdir(parents=True)
        (src / "tmp").mkdir()
        (src / "REVISION").write_text(f"{name}\n")
        (src / "config.ru").write_text(CONFIG_RU)
        print(f"   $ rsync -a upload/{name}/ releases/{name}/")
        subprocess.run(["rsync", "-a", f"{src}/", f"{self.app.releases}/{name}/"], check=True)
        if marker:
            print(f"   $ touch releases/{name}/.maintd-ready")
            (self.app.releases / name / ".maintd-ready").touch()

    def maintctl(self, *args: str, show: bool = True) -> str:
        """What `maintctl ARGS` prints, shown as typed when `show`; a command the demo relies on that fails ends
        the demo, saying why."""
        done = subprocess.run([str(BIN / "maintctl"), "--socket", str(self.app.socket), *args],
                              capture_output=True, text=True, timeout=60)
        if show:
            print(f"   $ maintctl {shlex.join(args)}")
            print("\n".join(f"   {line}" for line in (done.stdout + done.stderr).rstrip().splitlines()))
        if done.returncode:
            raise SystemExit(f"maintctl {shlex.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def status(self) -> dict:
        return json.loads(self.maintctl("status", "--json", show=False))

    def live_and_idle(self, name: str) -> None:
        wait_until(lambda: (s := self.status())["current"] == name and not s["deploying"], 30, f"{name} live")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)
        self.memcached.stop()


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="maintd-demo-"))
    base.chmod(0o755)  # nginx's workers read the tree
    demo = Demo(base)
    stack: NginxPuma | None = None
    visitor: Visitor | None = None
    try:
        app = demo.app
        say("a throw-away tree, memcached, and the first release uploaded by hand")
        demo.release("20261126090000", marker=False)
        os.symlink("releases/20261126090000", app.current)
        stack = NginxPuma(app)
        journal = journald_listens()
        app.config.write_text(f"""app = "shop"
root = "{app.root}"
[upload]
quiet_period = 2.0      # without a marker: live once nothing changed for 2 s
[memcached]
servers = ["{demo.memcached.address}"]
{stack.restart}
health_url = "http://127.0.0.1:{stack.port}/"
health_expect = "release {{release}}"
[hooks]
user = "root"           # the demo's tree is root's; on a server, the deploy user who owns releases/ (the default)
[control]
socket = "{app.socket}"
[state]
dir = "{app.state}"
""")
        print(f"   nginx on 127.0.0.1:{stack.port} (maintd's snippets) -> Puma -> {app.current}")
        print(f"   maintd's config ({app.config}):")
        print("\n".join(f"     {line}" for line in app.config.read_text().strip().splitlines()))
        log = base / "maintd.log"
        daemon = subprocess.Popen([str(BIN / "maintd"), "run", "--config", str(app.config), "--log-format",
                                   "journal" if journal else "json"], stderr=log.open("w"))
        demo.procs.append(daemon)
        wait_until(lambda: app.socket.exists(), 20, "maintd's socket")
        visitor = Visitor(stack.port)
        wait_until(lambda: visitor.seen, 20, "the first answer")

        say("upload 2: rsync, then the marker: live at once")
        with visitor.timeline():
            demo.release("20261126100000", marker=True)
            demo.live_and_idle("20261126100000")

        say("upload 3: rsync without a marker: live after 2 s of quiet (upload.quiet_period)")
        with visitor.timeline():
            demo.release("20261126110000", marker=False)
            demo.live_and_idle("20261126110000")

        say("what an operator sees")
        demo.maintctl("status")
        demo.maintctl("history", "-n", "3")

        say("operator maintenance, with a reason shown on the page")
        with visitor.timeline():
            on = time.monotonic()
            demo.maintctl("maintenance", "on", "--reason", "database upgrade", "--until", "10:30 UTC")
            visitor.wait_for(lambda seen: seen.count("503  maintenance page: database upgrade") >= 10, since=on)
            demo.maintctl("maintenance", "off")

        say("a rollback, through the same steps")
        with visitor.timeline():
            demo.maintctl("rollback")
        demo.live_and_idle("20261126100000")

        say("the audit trail of that rollback, as journalctl shows it")
        last = json.loads(demo.maintctl("history", "-n", "1", "--json", show=False))[-1]
        audit(daemon.pid, last["deploy_id"], log, journal)

        visitor.stop()
        others = [what for _, what in visitor.seen if not what.startswith(("200  release", "503  maintenance page"))]
        say(f"the visitor made {len(visitor.seen)} requests: " + (
            "each got a release or the maintenance page" if not others else f"{len(others)} got something else"))
        if others:
            raise SystemExit(f"unexpected answers: {sorted(set(others))}")
    finally:
        if visitor:
            visitor.stop()
        if stack:
            stack.stop()
        demo.stop()
        shutil.rmtree(base, ignore_errors=True)
    say("done: everything stopped and removed")


def audit(pid: int, deploy_id: str, log: Path, journal: bool) -> None:
    """`journalctl MAINTD_DEPLOY_ID=…`: one deploy, end to end."""
    print(f"   $ journalctl _PID={pid} MAINTD_DEPLOY_ID={deploy_id} -o short-iso")
    if journal:
        subprocess.run(["journalctl", f"_PID={pid}", f"MAINTD_DEPLOY_ID={deploy_id}", "-o", "short-iso",
                        "--no-pager"], check=False)
        return
    print("   (journald is not running here: maintd's JSON log, filtered the same way)")
    host = socket.gethostname()
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event.get("deploy_id") == deploy_id:
            print(f"   {event['timestamp'][:19]}+0000 {host} maintd[{pid}]: {event['event']}")


if __name__ == "__main__":
    main()
