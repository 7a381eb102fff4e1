"""The shape the code keeps: no class past 220 lines (a class that long holds more than one job)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "maintd"


def test_no_class_passes_220_lines():
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 220]
    assert long == []
