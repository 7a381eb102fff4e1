"""One version from one place: pyproject.toml's, printed by both commands as `maintd <version>` (contract §10)."""

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from conftest import BIN

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


def project_version() -> str:
    return str(tomllib.loads(PYPROJECT.read_text())["project"]["version"])


@pytest.mark.parametrize("command", ["maintd", "maintctl"])
def test_version_is_pyprojects(command):
    done = subprocess.run([str(BIN / command), "--version"], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"maintd {project_version()}\n", "")


def test_status_says_which_version_the_daemon_runs(app, start_daemon):
    """After a package upgrade the daemon restarts on the new code; status is how an operator (and the package
    test) tells which code answers."""
    from conftest import maintctl, maintctl_json

    start_daemon()
    assert maintctl_json(app, "status")["version"] == project_version()
    assert f"shop (maintd {project_version()})" in maintctl(app, "status").stdout


def test_code_never_installed_says_unknown_and_still_runs(tmp_path):
    """From a bare copy of the code (PYTHONPATH, no distribution metadata) the version is unknown, not an
    exception: the daemon reads it at start."""
    shutil.copytree(PYPROJECT.parent / "maintd", tmp_path / "maintd")
    done = subprocess.run(["/usr/bin/python3", "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                           "from maintd.version import version; print(version())", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "unknown\n"), done.stderr
