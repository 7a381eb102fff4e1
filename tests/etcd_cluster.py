"""A real 3-member etcd cluster from Debian's binary, on free loopback ports, for the cluster-mode tests.

Flags only, data in a temporary directory, heartbeat 50 ms and election timeout 500 ms so that leases of 1-2 s work
(etcd's minimum TTL is 1.5 election timeouts). Members are started, stopped, killed and restarted by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from conftest import free_port, wait_until

# Debian's binaries as `make test` unpacks them (see the Makefile), else any on the PATH.
UNPACKED = Path(__file__).resolve().parent.parent / ".deps" / "etcd" / "usr" / "bin"
ETCD, ETCDCTL = (str(UNPACKED / name) if (UNPACKED / name).exists() else shutil.which(name) or f"/usr/bin/{name}"
                 for name in ("etcd", "etcdctl"))


class EtcdCluster:
    def __init__(self, base: Path, size: int = 3) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.names = [f"etcd{i}" for i in range(size)]
        self.client = {name: free_port() for name in self.names}
        self.peer = {name: free_port() for name in self.names}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.initial = ",".join(f"{n}=http://127.0.0.1:{self.peer[n]}" for n in self.names)
        for name in self.names:
            self.start(name, state="new")
        self.wait_healthy()

    @property
    def endpoints(self) -> list[str]:
        return [self.url(name) for name in self.names]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.client[name]}"

    def start(self, name: str, state: str = "existing") -> None:
        log = open(self.base / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it until it ends
        self.procs[name] = subprocess.Popen(
            [ETCD, "--name", name, "--data-dir", str(self.base / name),
             "--listen-client-urls", self.url(name), "--advertise-client-urls", self.url(name),
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer[name]}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer[name]}",
             "--initial-cluster", self.initial, "--initial-cluster-state", state,
             "--initial-cluster-token", f"maintd-test-{os.getpid()}",
             "--heartbeat-interval", "50", "--election-timeout", "500", "--logger", "zap", "--log-level", "warn"],
            stdout=log, stderr=log)
        log.close()

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop_all(self) -> None:
        """SIGKILL (a graceful stop takes seconds), and the data thrown away at once: each member preallocates
        ~120 MB of write-ahead log, which pytest would keep for its last three runs of every test (tens of GB for
        the suite). The logs stay, for a test that failed."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for name, proc in self.procs.items():
            proc.wait(10)
            shutil.rmtree(self.base / name, ignore_errors=True)

    def etcdctl(self, *args: str, endpoints: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ETCDCTL, "--endpoints", ",".join(endpoints or self.endpoints),
                               "--dial-timeout", "1s", "--command-timeout", "2s", *args],
                              capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=30)

    def healthy(self) -> bool:
        running = [n for n in self.names if self.procs[n].poll() is None]
        return self.etcdctl("endpoint", "health", endpoints=[self.url(n) for n in running]).returncode == 0

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_until(self.healthy, timeout, "etcd to be healthy")

    def leader(self) -> str:
        done = self.etcdctl("endpoint", "status", "--write-out", "json")
        for entry in json.loads(done.stdout):
            if entry["Status"]["leader"] == entry["Status"]["header"]["member_id"]:
                return next(n for n in self.names if self.url(n) == entry["Endpoint"])
        raise AssertionError(f"no leader: {done.stdout} {done.stderr}")
