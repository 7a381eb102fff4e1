"""maintd's version, from one place: pyproject.toml's `version`, as the installed distribution records it.

Read through importlib.metadata only when asked (`--version`, the generated man pages, the Debian package's
version), never at import: maintctl must start in a few tens of milliseconds, and importlib.metadata costs some.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def version() -> str:
    """The installed distribution's version; "unknown" for code run from a source tree that was never installed
    (PYTHONPATH=...), which has no metadata to read and must still start."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("maintd")
    except PackageNotFoundError:
        return "unknown"


class VersionAction(argparse.Action):
    """`--version`: prints `maintd <version>` and exits 0, for both commands (they are one package, one version).
    argparse's own "version" action takes the string when the parser is built, which would read the metadata on
    every start."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str = "print maintd's version and exit") -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"maintd {version()}")
        parser.exit()
