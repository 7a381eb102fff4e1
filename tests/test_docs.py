"""The generated man pages and maintctl's completion (maintd/docs.py, maintd/completion.py): every command, option
and config key is in them, `man` renders them without a warning, and bash completes what the command table holds."""

import os
import shutil
import subprocess
from datetime import date
from pathlib import Path

import pytest

from maintd import config, docs
from maintd.cli import maintctl_parser, maintd_parser
from maintd.commands import COMMANDS
from maintd.completion import bash_completion

README = Path(__file__).parent.parent / "README.md"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    assert docs.main([str(out)]) == 0
    return out


def rendered(page: Path) -> tuple[str, str]:
    """The page as `man` shows it at 80 columns, and what `man --warnings` said about it."""
    done = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                          env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "", "PAGER": "cat"})
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


@pytest.mark.skipif(not shutil.which("man"), reason="man-db is missing")
@pytest.mark.parametrize("page", docs.PAGES)
def test_man_renders_each_page_without_a_warning(built, page):
    text, warnings = rendered(built / page)
    assert warnings == "" and "NAME" in text and "SEE ALSO" in text
    assert "`" not in text  # markdown's code spans are bold, not backticks


def every_option(parser) -> set[str]:
    flags = {flag for action in docs._options(parser) for flag in action.option_strings}
    if sub := docs._subcommands(parser):
        for child in sub.choices.values():
            flags |= every_option(child)
    return flags


@pytest.mark.skipif(not shutil.which("man"), reason="man-db is missing")
def test_every_command_and_option_is_in_its_page(built):
    maintctl, _ = rendered(built / "maintctl.1")
    for name, command in COMMANDS.items():
        assert f"\n       {name}" in maintctl, name  # a command heads its own entry
        assert command.help.split(";")[0][:30] in " ".join(maintctl.split()), name
    for flag in every_option(maintctl_parser()):
        assert f"{flag} " in maintctl or f"{flag}\n" in maintctl, flag
    assert "[--config CONFIG | --socket SOCKET]" in " ".join(maintctl.split())  # one or the other, as --help says
    maintd, _ = rendered(built / "maintd.8")
    for flag in every_option(maintd_parser()):
        assert flag in maintd, flag
    assert "\n       run " in maintd and "\n       check " in maintd


@pytest.mark.skipif(not shutil.which("man"), reason="man-db is missing")
def test_every_config_key_is_in_maintd_toml_5_with_its_default(built):
    text, _ = rendered(built / "maintd.toml.5")
    for table, key, default in docs.schema():
        assert f"[{table}]" in text if table else "top level" in text
        shown = f"{key} = {default}" if default is not None else key
        assert f"\n       {shown}" in text, shown
    assert 'namespace_key = "APP:cache-version"' in text  # a default named after the app, as parse fills it in


def test_every_default_the_page_shows_is_one_the_file_may_say(tmp_path):
    """What maintd.toml(5) shows as `key = default`, written in a file, means the default: maintd takes it, and
    it comes out as the value left unsaid does."""
    required = {"": 'app = "shop"\nroot = "/srv/shop"\n', "cluster": 'members = ["app1"]\nmember = "app1"\n'}
    plain = config.parse(required[""] + "[cluster]\n" + required["cluster"])
    for table, key, default in docs.schema():
        if default is None or (not table and key in ("app", "root")):
            continue
        head = required[""] + (f"[{table}]\n" + required.get(table, "") if table else "")
        said = config.parse(head + f"{key} = {default.replace('APP', 'shop')}\n")  # the page's APP: the app's name
        section = getattr(said, table) if table else said
        unsaid = getattr(plain, table) if table else plain
        assert getattr(section, key) == getattr(unsaid, key), f"{table}.{key} = {default}"


def test_a_key_without_its_sentence_or_a_sentence_without_its_key_stops_the_build():
    sentences = {f"{table}.{key}" if table else key: "says what it does" for table, key, _ in docs.schema()}
    del sentences["upload.marker"]
    with pytest.raises(docs.DocError, match=r"no sentence for upload\.marker"):
        docs.keys_section(sentences)
    with pytest.raises(docs.DocError, match=r"upload\.colour is not a key"):
        docs.keys_section({**sentences, "upload.marker": "x", "upload.colour": "x"})


def test_every_command_is_in_the_readme():
    readme = README.read_text()
    for name in COMMANDS:
        assert f"`{name}" in readme or f"maintctl {name}" in readme, name


BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


def complete(script: Path, line: str) -> list[str]:
    """What bash, with bash-completion and our script loaded, offers for the last word of `line`."""
    words = line.split(" ")  # a line ending in a space ends in an empty word: the one being completed
    quoted = " ".join(f"'{word}'" for word in words)
    program = (f"source {BASH_COMPLETION}; source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1};"
               f" COMP_LINE='{line}'; COMP_POINT={len(line)}; _maintctl; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return sorted(filter(None, done.stdout.splitlines()))


@pytest.mark.skipif(not BASH_COMPLETION.exists(), reason="bash-completion is missing")
def test_bash_completes_commands_their_options_and_sub_commands(built):
    script = built / "maintctl"
    assert complete(script, "maintctl ") == sorted([*COMMANDS, "--version", "--config", "--socket", "--timeout"])
    assert complete(script, "maintctl ro") == ["rollback"]
    assert complete(script, "maintctl maintenance ") == ["off", "on"]
    assert complete(script, "maintctl maintenance on --") == ["--reason", "--until"]
    assert complete(script, "maintctl --socket /run/x.sock deploy r1 --f") == ["--follow"]  # past a release name
    assert complete(script, "maintctl history ") == ["--json", "-n"]


def test_completion_holds_every_command_and_option():
    script = bash_completion(maintctl_parser())
    for flag in every_option(maintctl_parser()) | set(COMMANDS):
        assert flag in script, flag


def test_the_units_document_themselves_with_pages_that_exist():
    import re

    units = Path(__file__).parent.parent / "systemd"
    for unit in units.glob("maintd@.*"):
        named = re.findall(r"^Documentation=(.*)$", unit.read_text(), re.M)
        assert named, unit.name
        for page in " ".join(named).split():
            if page == "file:///usr/local/share/doc/maintd/README.md":  # installed by `make files`, beside the pages
                continue
            found = re.fullmatch(r"man:(\S+)\((\d)\)", page)
            assert found and f"{found[1]}.{found[2]}" in docs.PAGES, f"{unit.name}: {page}"


def test_the_pages_date_is_the_builds_source_date_when_it_says_one(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")  # as dpkg-buildpackage sets it, from the changelog
    assert docs.built_on() == date(1970, 1, 2)


def test_roff_takes_a_code_span_as_it_is_and_emphasis_outside_it():
    assert docs.roff("`maintd@*` and *this*, **that**, a ` alone") == (
        "\\fBmaintd@*\\fR and \\fIthis\\fR, \\fBthat\\fR, a ` alone")
