"""One version from one place: pyproject.toml's, printed by both commands as `maintd <version>` (contract §10)."""

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
