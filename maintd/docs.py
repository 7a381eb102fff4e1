"""The man pages maintd(8), maintctl(1) and maintd.toml(5), and maintctl's bash completion, generated at build time.

What could drift from the code is generated from it: commands, options and their help from the argparse parsers
(maintctl's is built from the command table in commands.py, so a page cannot miss a command `--help` shows), config
keys and their defaults from the schema in config.py. What a reader needs beyond that is prose, written once in
doc/<page>.md in a small Markdown subset (see `Page`), with `{{commands}}` or `{{keys}}` where the generated part
goes. A key of the schema without its sentence in doc/maintd.toml.5.md, or a sentence for a key that does not exist,
stops the build.

    python -m maintd.docs OUTDIR      writes OUTDIR/maintd.8, maintctl.1, maintd.toml.5 and maintctl (completion)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from . import config
from .cli import maintctl_parser, maintd_parser
from .version import version

PROSE = Path(__file__).parent.parent / "doc"
PAGES = ("maintd.8", "maintctl.1", "maintd.toml.5")


class DocError(Exception):
    """Prose and code disagree (a key without its sentence, a sentence without its key)."""


def roff(text: str) -> str:
    """One line of prose as roff: backslashes escaped, **bold**, `code` (bold too) and *italic*, no line read as a
    request."""
    pieces = re.split(r"(`[^`]+`)", text.replace("\\", "\\e"))  # a code span is taken as it is: `maintd@*`
    text = "".join(f"\\fB{piece[1:-1]}\\fR" if re.fullmatch(r"`[^`]+`", piece) else _emphasis(piece)
                   for piece in pieces)
    return "\\&" + text if text.startswith((".", "'")) else text


def _emphasis(text: str) -> str:
    text = re.sub(r"\*\*(.+?)\*\*", r"\\fB\1\\fR", text)
    return re.sub(r"\*(.+?)\*", r"\\fI\1\\fR", text)


def option(text: str) -> str:
    """An option or command as roff prints it: bold, with minus signs that are minus signs (copy-paste works)."""
    return "\\fB" + roff(text).replace("-", "\\-") + "\\fR"


# --- commands, from the parsers -----------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any] | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _usage(action: argparse.Action) -> str:
    """How an option or positional is written in a synopsis: `--reason REASON`, `[NAME]`, `on|off`."""
    if isinstance(action, argparse._SubParsersAction):
        return f"{action.metavar} ..." if action.metavar and "|" not in action.metavar else "|".join(action.choices)
    if not action.option_strings:
        name = str(action.metavar or action.dest.upper())
        return f"[{name}]" if action.nargs == "?" else name
    flag = action.option_strings[-1] if len(action.option_strings) > 1 else action.option_strings[0]
    value = action.metavar or ("|".join(action.choices) if action.choices else action.dest.upper())
    return flag if action.nargs == 0 else f"{flag} {value}"


def _help(action: argparse.Action) -> str:
    return (action.help or "").replace("%%", "%")


def _synopsis(parser: argparse.ArgumentParser) -> str:
    """As argparse's usage line has it (options one may give only one of in one pair of brackets), without -h."""
    exclusive = {id(a): group for group in parser._mutually_exclusive_groups for a in group._group_actions}
    parts: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if group := exclusive.get(id(action)):
            if action is group._group_actions[0]:
                parts.append("[" + " | ".join(_usage(a) for a in group._group_actions) + "]")
        elif action.option_strings and not action.required:
            parts.append(f"[{_usage(action)}]")
        else:
            parts.append(_usage(action))
    return " ".join(parts)


def _described_options(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in _options(parser):
        yield from (".TP", option(_usage(action)), roff(_help(action)))


def synopsis_section(parser: argparse.ArgumentParser) -> list[str]:
    return [".SH SYNOPSIS", f"{option(parser.prog)} {_code(_synopsis(parser))}"]


def _code(text: str) -> str:
    return roff(text).replace("-", "\\-")


def commands_section(parser: argparse.ArgumentParser) -> list[str]:
    """OPTIONS and COMMANDS of a command whose sub-commands are argparse sub-parsers: each command with its
    synopsis, its help, and its own options and sub-commands indented under it."""
    sub = _subcommands(parser)
    assert sub is not None, "a command line without sub-commands"
    helps = {a.dest: _help(a) for a in sub._choices_actions}
    lines = [".SH OPTIONS", *_described_options(parser), ".SH COMMANDS"]
    for name, command in sub.choices.items():
        lines += [".TP", f"{option(name)} {_code(_synopsis(command))}", roff(helps[name])]
        inner = [*_described_options(command)]
        if choices := _subcommands(command):
            for choice, choice_parser in choices.choices.items():
                inner += [".TP", f"{option(name + ' ' + choice)} {_code(_synopsis(choice_parser))}".rstrip(), ""]
                if options := [*_described_options(choice_parser)]:
                    inner[-1:] = [".RS", *options, ".RE"]
        if inner:
            lines += [".RS", *inner, ".RE"]
    return lines


# --- config keys, from the schema ---------------------------------------------------------------------------------


def _toml(value: Any) -> str:
    """A default as it would be written in the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str):
        return '"' + value.replace("{app}", "APP") + '"'
    if isinstance(value, tuple) and not dataclasses.is_dataclass(value):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.1f}" if value == int(value) else str(value)
    return str(value)


def built_on() -> date:
    """The pages' date: SOURCE_DATE_EPOCH's where the build sets it (dpkg-buildpackage does, from the changelog), so
    two builds of one source give the same pages; else today."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    return datetime.fromtimestamp(int(epoch), UTC).date() if epoch.isdigit() else date.today()


def schema() -> Iterator[tuple[str, str, str | None]]:
    """Every key of the file in the schema's order: (table, key, its default as TOML, or None where there is none)."""
    for key in config.TOP_LEVEL:
        fields = {f.name: f for f in dataclasses.fields(config.Config)}
        yield "", key, _default(fields[key])
    for table, (section_type, checks) in {**config.SECTIONS, **config.OPTIONAL}.items():
        fields = {f.name: f for f in dataclasses.fields(section_type)}
        for key in checks:
            derived = config.DERIVED.get(table, {}).get(key)
            yield table, key, _toml(derived) if derived else _default(fields[key])


def _default(field: dataclasses.Field[Any]) -> str | None:
    if "written" in field.metadata:  # a default held otherwise than a file says it, or worked out at run time
        written: str | None = field.metadata["written"]
        return written
    if field.default is not dataclasses.MISSING:
        return _toml(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return _toml(field.default_factory())
    return None


def keys_section(sentences: dict[str, str]) -> list[str]:
    """Each key under its table, with its default and its sentence from the prose."""
    known = {f"{table}.{key}" if table else key for table, key, _ in schema()}
    if missing := [k for k in known if k not in sentences]:
        raise DocError(f"doc/maintd.toml.5.md: no sentence for {', '.join(sorted(missing))}")
    if stale := [k for k in sentences if k not in known]:
        raise DocError(f"doc/maintd.toml.5.md: {', '.join(stale)} is not a key of the file")
    lines: list[str] = []
    shown = None
    for table, key, default in schema():
        if table != shown:
            lines += [".SS " + (f"[{table}]" if table else "top level")]
            shown = table
        lines += [".TP", option(key) + (f" = {roff(default)}" if default is not None else ""),
                  roff(sentences[f"{table}.{key}" if table else key])]
    return lines


# --- the pages ----------------------------------------------------------------------------------------------------


class Page:
    """One doc/<page>.md as roff. The subset: `# name section "title"` first; `## HEADING`; paragraphs split by blank
    lines; `term` then `: definition` (continued on the following lines); lines indented by four spaces kept as they
    are (examples); **bold**, *italic*; `{{commands}}` and `{{keys}}` for the generated parts. Definitions under
    `## KEYS` are the config keys' sentences, placed by `{{keys}}` in the schema's order."""

    def __init__(self, name: str, prose: Path = PROSE) -> None:
        self.name = name
        self.text = (prose / f"{name}.md").read_text(encoding="utf-8")

    def render(self, generated: dict[str, list[str]]) -> str:
        head, *blocks = re.split(r"\n\s*\n", self.text.strip())
        title = re.fullmatch(r'# (\S+) (\d) "(.+)"', head.splitlines()[0])
        assert title, f"doc/{self.name}.md must start with: # name section \"title\""
        command, section, what = title.groups()
        out = [f'.TH "{command.upper()}" "{section}" "{built_on():%Y-%m-%d}" "maintd {version()}"',
               ".SH NAME", f"{roff(command)} \\- {roff(what)}", *generated.get("synopsis", [])]
        heading = ""
        sentences: dict[str, str] = {}
        for block in blocks:
            lines = block.splitlines()
            if lines[0].startswith("## "):
                heading = lines[0][3:]
                out.append(f".SH {heading}")
                lines = lines[1:]
            if not lines:
                continue
            if lines[0].strip().startswith("{{") and lines[0].strip().endswith("}}"):
                out += generated[lines[0].strip()[2:-2]]
            elif len(lines) > 1 and lines[1].startswith(": "):
                sentence = " ".join([lines[1][2:], *lines[2:]])
                if heading == "KEYS":
                    sentences[lines[0]] = sentence
                else:
                    out += [".TP", roff(lines[0]), roff(sentence)]
            elif all(line.startswith("    ") for line in lines):
                out += [".PP", ".RS 4", ".nf", *(roff(line[4:]) for line in lines), ".fi", ".RE"]
            else:
                out += [".PP", *(roff(line) for line in lines)]
        if sentences:
            at = out.index("{{keys}}")
            out[at:at + 1] = keys_section(sentences)
        return "\n".join(out) + "\n"


def pages() -> dict[str, str]:
    """Every man page's roff by its file name."""
    return {
        "maintd.8": Page("maintd.8").render({"synopsis": synopsis_section(maintd_parser()),
                                             "commands": commands_section(maintd_parser())}),
        "maintctl.1": Page("maintctl.1").render({"synopsis": synopsis_section(maintctl_parser()),
                                                 "commands": commands_section(maintctl_parser())}),
        "maintd.toml.5": Page("maintd.toml.5").render({"keys": ["{{keys}}"]}),
    }


def main(argv: list[str]) -> int:
    """Writes the pages and maintctl's completion into the directory named."""
    from .completion import bash_completion

    if len(argv) != 1:
        print("usage: python -m maintd.docs OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    try:
        written = {**pages(), "maintctl": bash_completion(maintctl_parser())}
    except DocError as exc:
        print(f"maintd.docs: {exc}", file=sys.stderr)
        return 1
    for name, text in written.items():
        (out / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
