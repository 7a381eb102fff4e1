"""The maintenance flag the web server checks, and the page it serves while the flag exists.

The flag is a file inside a release (`maintenance.file`, seen by the web server through `current`). Writing it into
both the live and the incoming release before the swap keeps maintenance on across the swap with no gap. Both files
are made aside and renamed into place, so the web server never reads half a page. The release is the uploader's:
its directories are walked confined (see confined.py), so a `tmp` that is a symlink out of the app's tree refuses
the flag before anything is made, and what is made is the release owner's.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .confined import Confined, PathRefused

PAGE_NAME = "maintenance.html"


@dataclass(frozen=True)
class Notice:
    """Why the site is down, since when and by whom: the flag's body, the page's text, and (remembered in the state)
    an operator's maintenance."""

    reason: str
    since: str
    by: str
    until: str = ""

    def body(self) -> str:
        lines = [f"reason: {self.reason}", f"since: {self.since}", f"by: {self.by}"]
        if self.until:
            lines.append(f"until: {self.until}")
        return "\n".join(lines) + "\n"


def default_template() -> str:
    return resources.files("maintd").joinpath(PAGE_NAME).read_text(encoding="utf-8")


def render(template: str, notice: Notice) -> str:
    """Fill the page's `{{reason}}` and `{{until}}`, escaped: the reason comes from an operator's command line."""
    until = f"Expected back by {notice.until}." if notice.until else ""
    return template.replace("{{reason}}", html.escape(notice.reason)).replace("{{until}}", html.escape(until))


class Flags:
    """Puts the flag and its page into release directories, and the flag away again."""

    def __init__(self, flag: str, template: str, root: Path) -> None:
        self.flag = flag
        self.template = template
        self.root = root  # the app's tree, which the flag's directory must not lead out of
        self._dir, self._name = os.path.split(os.path.normpath(flag))

    def paths(self, release: Path) -> tuple[Path, Path]:
        flag = release / self.flag
        return flag, flag.parent / PAGE_NAME

    def raise_in(self, release: Path, notice: Notice) -> None:
        """Write the page first, then the flag, so the flag never points the web server at a missing page."""
        with Confined.open(self.root, release) as top, top.dir(self._dir, create=True) as where:
            where.write(PAGE_NAME, render(self.template, notice))
            where.write(self._name, notice.body())

    def lower_in(self, release: Path) -> None:
        """Remove the flag: from that instant the site is back. The page stays: a request that saw the flag an
        instant earlier is still on its way to the page (Apache answered its own 503 "ErrorDocument" error when the
        page went with the flag), and the next maintenance writes it afresh. Where the flag's directory is missing
        or leads out of the tree, no flag of maintd's can be: `raise_in` never makes one there."""
        try:
            with Confined.open(self.root, release) as top, top.dir(self._dir) as where:
                where.unlink(self._name)
        except (FileNotFoundError, NotADirectoryError, PathRefused):
            pass

    def is_up(self, release: Path) -> bool:
        try:
            with Confined.open(self.root, release) as top, top.dir(self._dir) as where:
                return where.kind(self._name) is not None
        except (FileNotFoundError, NotADirectoryError, PathRefused):
            return False
