"""make demo-cluster: three app servers on one machine (three trees, three maintd) and a 3-member etcd; one rsync to
all three, and the timeline each server's visitors would see, side by side. Everything is removed at the end."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent)]

from etcd_cluster import EtcdCluster  # noqa: E402

from conftest import BIN, wait_until  # noqa: E402

MEMBERS = ("app1", "app2", "app3")


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def release(where: Path, name: str) -> Path:
    """A tiny Rack app that says which release it is."""
    (where / "public").mkdir(parents=True)
    (where / "REVISION").write_text(f"{name}\n")
    (where / "config.ru").write_text(f'run ->(env) {{ [200, {{}}, ["release {name}\\n"]] }}\n')
    (where / "public" / "index.html").write_text(f"<h1>release {name}</h1>\n")
    return where


class Server:
    def __init__(self, work: Path, name: str, etcd: EtcdCluster) -> None:
        self.work, self.name, self.root, self.etcd = work, name, work / name / "srv", etcd
        (self.root / "releases").mkdir(parents=True)
        self.config = work / name / "shop.toml"
        self.log = open(work / name / "maintd.log", "a")  # noqa: SIM115 - closed in stop()
        self.start()

    def start(self, cluster: str = "") -> None:
        """maintd with this config; `cluster`: more [cluster] keys (read at start, as every [cluster] key is)."""
        work, name, etcd = self.work, self.name, self.etcd
        self.config.write_text(f"""app = "shop"
root = "{self.root}"
[upload]
require_marker = true
[memcached]
flush = "none"
[restart]
method = "command"
command = ["true"]
[hooks]
user = "root"
[control]
socket = "{work / name / 'shop.sock'}"
[state]
dir = "{work / name / 'state'}"
[cluster]
members = {json.dumps(list(MEMBERS))}
member = "{name}"
etcd = {json.dumps(etcd.endpoints)}
lease_ttl = 2.0
{cluster}
""")
        self.proc = subprocess.Popen([str(BIN / "maintd"), "run", "--config", str(self.config), "--log-format",
                                      "json"], stderr=self.log)

    def seen(self) -> str:
        """What a visitor gets from this server now: the maintenance page, or the release that answers."""
        current = self.root / "current"
        try:
            release = (current / "REVISION").read_text().strip()
        except OSError:
            return "-"
        # The page, and (for the reader of the demo) the release behind it.
        return f"503 ({release})" if (current / "tmp" / "maintenance.txt").exists() else f"200 {release}"

    def stop(self, for_good: bool = True) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        if for_good:
            self.log.close()


def upload(work: Path, servers: list[Server], name: str) -> None:
    source = release(work / "upload" / name, name)
    for server in servers:  # as a deploy script would: the files, then the marker, to each server
        subprocess.run(["rsync", "-a", f"{source}/", f"{server.root / 'releases' / name}/"], check=True)
    for server in servers:
        (server.root / "releases" / name / ".maintd-ready").touch()


def watch(servers: list[Server], until: str, stop: threading.Event) -> list[tuple[float, list[str]]]:
    """Every change any server's visitors would see, with when it happened."""
    changes: list[tuple[float, list[str]]] = []
    last: list[str] = []
    while not stop.is_set():
        now = [s.seen() for s in servers]
        if now != last:
            changes.append((time.monotonic(), now))
            last = now
        if all(state == f"200 {until}" for state in now) and len(changes) > 1:
            break
    return changes


def run_switch(work: Path, servers: list[Server], name: str) -> None:
    stop = threading.Event()
    result: list[list[tuple[float, list[str]]]] = []
    watcher = threading.Thread(target=lambda: result.append(watch(servers, name, stop)))
    watcher.start()
    upload(work, servers, name)
    watcher.join(60)
    stop.set()
    changes = result[0] if result else []
    t0 = changes[0][0] if changes else 0.0
    print(f"{'ms':>8}  " + "".join(f"{s.name:<14}" for s in servers))
    for when, states in changes:
        print(f"{(when - t0) * 1000:8.1f}  " + "".join(f"{state:<14}" for state in states))


def steps_of(work: Path, name: str) -> None:
    """One switch as app2's journal has it: each step with its result, duration, switch id and batch."""
    for line in (work / "app2" / "maintd.log").read_text().splitlines():
        event = json.loads(line)
        if event.get("release") == name and event.get("step"):
            batch = f"  batch {event['batch']}" if event.get("batch") is not None else ""
            print(f"  {event['step']:<16} {event['result']:<8} {event['duration_ms']:>8} ms  "
                  f"switch {event['switch_id']}{batch}")


def wait_all_alive(server: Server) -> None:
    """Until `maintctl cluster` says every member is there (each maintd has taken its lease)."""

    def all_alive() -> bool:
        done = subprocess.run([str(BIN / "maintctl"), "--config", str(server.config), "cluster", "--json"],
                              capture_output=True, text=True)
        return done.returncode == 0 and all(m["alive"] for m in json.loads(done.stdout)["members"])

    wait_until(all_alive, 30, "every member to come up")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="maintd-demo-cluster-"))
    etcd = servers = None
    try:
        say("a 3-member etcd on loopback, and three app servers, each with its own tree and maintd")
        etcd = EtcdCluster(work / "etcd")
        servers = [Server(work, name, etcd) for name in MEMBERS]
        wait_all_alive(servers[0])
        say("r1 uploaded to all three (rsync, then the marker): the first switch")
        run_switch(work, servers, "r1")
        say("r2 uploaded to all three: no server leaves maintenance before every server has swapped")
        run_switch(work, servers, "r2")
        say("maintctl cluster")
        subprocess.run([str(BIN / "maintctl"), "--config", str(servers[0].config), "cluster"], check=True)
        say("one switch in app2's log (its steps, with MAINTD_SWITCH_ID)")
        steps_of(work, "r2")
        say('now strategy = "rolling", batch = 1, batch_wait = 1.0 (canary: app1): r3 one server at a time, no page')
        for server in servers:
            server.stop(for_good=False)
        for server in servers:
            server.start('strategy = "rolling"\nbatch = 1\nbatch_wait = 1.0')
        wait_all_alive(servers[0])
        run_switch(work, servers, "r3")
        say("the rolling switch in app2's log (MAINTD_BATCH: app2 is in batch 2)")
        steps_of(work, "r3")
        return 0
    finally:
        for server in servers or []:
            server.stop()
        if etcd:
            etcd.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
