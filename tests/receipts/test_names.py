"""The receipts package names each class and exception once (issue 14's re-cut): a
reader who finds ``RetryPolicy`` in a traceback or a review knows which one it is."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "services" / "receipts"


def test_each_class_name_is_defined_once_in_the_package() -> None:
    places: dict[str, list[str]] = defaultdict(list)
    for module in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(module.read_text(), str(module))):
            if isinstance(node, ast.ClassDef):
                places[node.name].append(f"{module.relative_to(PACKAGE)}:{node.lineno}")
    assert len(places) > 100  # the walk saw the package
    assert {name: where for name, where in places.items() if len(where) > 1} == {}
