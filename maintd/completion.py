"""maintctl's bash completion, generated from its parser (itself built from the command table in commands.py), so a
new command or option completes the day it exists. Installed as /usr/share/bash-completion/completions/maintctl.

It completes the global options and the commands, then the chosen command's options and sub-commands
(`maintenance on|off`, then `on`'s `--reason`/`--until`); `--config` completes *.toml files, `--socket` any file.
"""

from __future__ import annotations

import argparse
import shlex

from .docs import _options, _subcommands


def _words(parser: argparse.ArgumentParser) -> list[str]:
    """What may follow on the command line at this level: its options, then its sub-commands."""
    words = [flag for action in _options(parser) for flag in action.option_strings]
    if sub := _subcommands(parser):
        words += list(sub.choices)
    return words


def _taking_values(parser: argparse.ArgumentParser) -> set[str]:
    """Every option anywhere under `parser` that is followed by a value."""
    flags = {flag for action in _options(parser) if action.nargs != 0 for flag in action.option_strings}
    if sub := _subcommands(parser):
        for child in sub.choices.values():
            flags |= _taking_values(child)
    return flags


def _paths(parser: argparse.ArgumentParser, path: str = "") -> dict[str, list[str]]:
    """The command words that may be typed ("", "maintenance", "maintenance on") and the words that may follow each."""
    paths = {path: _words(parser)}
    if sub := _subcommands(parser):
        for name, child in sub.choices.items():
            paths |= _paths(child, f"{path} {name}".strip())
    return paths


def bash_completion(parser: argparse.ArgumentParser) -> str:
    prog = parser.prog
    values = " ".join(sorted(_taking_values(parser)))
    paths = _paths(parser)
    return "\n".join([
        f"# bash completion for {prog}: generated from its command table by maintd/completion.py; do not edit.",
        f"_{prog}() {{",
        "    local cur prev words cword",
        "    _init_completion || return",
        "    case $prev in",
        "        --config) _filedir toml; return ;;",
        "        --socket) _filedir; return ;;",
        f"        {'|'.join(sorted(_taking_values(parser) - {'--config', '--socket'}))}) return ;;",
        "    esac",
        "    local i path=",
        "    for ((i = 1; i < cword; i++)); do",
        "        case ${words[i]} in",
        f"            {values.replace(' ', '|')}) ((i++)) ;;",
        "            -*) ;;",
        # a word that extends the command typed so far (`maintenance`, then `on`) does; any other is a positional
        '            *) case "${path:+$path }${words[i]}" in',
        f"                   {'|'.join(shlex.quote(p) for p in paths if p)})",
        '                       path="${path:+$path }${words[i]}" ;;',
        "               esac ;;",
        "        esac",
        "    done",
        "    local words_here",
        "    case $path in",
        *(f"        {shlex.quote(path)}) words_here={shlex.quote(' '.join(following))} ;;"
          for path, following in paths.items()),
        "        *) return ;;",
        "    esac",
        '    COMPREPLY=($(compgen -W "$words_here" -- "$cur"))',
        "}",
        f"complete -F _{prog} {prog}",
        "",
    ])
