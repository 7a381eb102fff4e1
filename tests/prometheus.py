"""A real Prometheus (Debian's 2.42, unpacked by the Makefile as etcd is) on a free loopback port, scraping given
targets every second and evaluating rules every second, its data in the test's directory; stopped by pid."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from conftest import free_port, port_open, wait_until

UNPACKED = Path(__file__).resolve().parent.parent / ".deps" / "prometheus" / "usr" / "bin"
PROMETHEUS, PROMTOOL = (str(UNPACKED / name) if (UNPACKED / name).exists() else shutil.which(name) or f"/usr/bin/{name}"
                        for name in ("prometheus", "promtool"))


class Prometheus:
    def __init__(self, base: Path, targets: list[str], rules: Path | None = None) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = base / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(rules)] if rules else [],
            "scrape_configs": [{"job_name": "maintd", "static_configs": [{"targets": targets}]}]}))
        log = open(base / "prometheus.log", "ab")  # noqa: SIM115 - the process owns it until it ends
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={base / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=log, stderr=log)
        log.close()
        wait_until(lambda: port_open(self.port), 30, f"prometheus on {self.port}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def values(self, expr: str) -> dict[str, float]:
        """An instant query's result: each series' labels (but the job's and the instance's) as text -> value."""
        return {",".join(f"{k}={v}" for k, v in sorted(series["metric"].items()) if k not in ("job", "instance")):
                float(series["value"][1]) for series in self.query(expr)}

    def wait_for(self, expr: str, expected: dict[str, float], timeout: float = 60.0) -> None:
        """Until the query's result is `expected` exactly; fails naming the last result."""
        seen: list[dict[str, float]] = []

        def matches() -> bool:
            seen[:] = [self.values(expr)]
            return seen[0] == expected

        try:
            wait_until(matches, timeout, f"{expr} == {expected}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last result: {seen}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
