"""The shape the code keeps: no class past 220 lines (a class that long holds more than one job)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "maintd"


def test_no_class_passes_220_lines():
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 220]
    assert long == []


def test_constraints_pin_every_dependency_within_pyprojects_range_and_the_venv_runs_the_pins():
    """constraints.txt is what the package carries (make wheels) and what the tests ran with (make deps): every
    dependency of pyproject.toml, the test tools too, pinned to a version pyproject allows, installed as pinned."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    tree = PACKAGE.parent
    project = tomllib.loads((tree / "pyproject.toml").read_text())["project"]
    lines = [line.split("#")[0].strip() for line in (tree / "constraints.txt").read_text().splitlines()]
    pins = {canonicalize_name(pin.name): next(iter(pin.specifier)).version
            for pin in map(Requirement, filter(None, lines))}
    for wanted in map(Requirement, [*project["dependencies"], *project["optional-dependencies"]["test"]]):
        pinned = pins.get(canonicalize_name(wanted.name))
        assert pinned is not None, f"{wanted.name} is not pinned in constraints.txt"
        assert wanted.specifier.contains(pinned), f"constraints.txt pins {wanted.name} {pinned}, outside {wanted}"
        assert version(wanted.name) == pinned, f"{wanted.name} {version(wanted.name)} installed, {pinned} pinned"
