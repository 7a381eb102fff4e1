"""The maintenance flag the web server checks, and the page it serves while the flag exists.

The flag is a file inside a release (`maintenance.file`, seen by the web server through `current`). Writing it into
both the live and the incoming release before the swap keeps maintenance on across the swap with no gap. Both files
are written under a temporary name and renamed, so the web server never reads half a page.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .tree import make_dirs, write_atomically

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

    def paths(self, release: Path) -> tuple[Path, Path]:
        flag = release / self.flag
        return flag, flag.parent / PAGE_NAME

    def raise_in(self, release: Path, notice: Notice) -> None:
        """Write the page first, then the flag, so the flag never points the web server at a missing page."""
        flag, page = self.paths(release)
        make_dirs(flag.parent, release, self.root)
        write_atomically(page, render(self.template, notice), durable=False)
        write_atomically(flag, notice.body(), durable=False)

    def lower_in(self, release: Path) -> None:
        """Remove the flag: from that instant the site is back. The page stays: a request that saw the flag an
        instant earlier is still on its way to the page (Apache answered its own 503 "ErrorDocument" error when the
        page went with the flag), and the next maintenance writes it afresh."""
        try:
            self.paths(release)[0].unlink()
        except FileNotFoundError:
            pass

    def is_up(self, release: Path) -> bool:
        return self.paths(release)[0].exists()
