"""The contracts stand alone: nothing in proto/ imports Vitrine's services or libraries."""

from __future__ import annotations

import ast
from pathlib import Path

PROTO = Path(__file__).resolve().parents[2] / "proto"


def test_proto_imports_nothing_of_ours_but_proto() -> None:
    ours = {"vitrine", "services", "tests", "benchmarks"}
    found = {}
    for module in sorted(PROTO.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            names = (
                [alias.name for alias in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            for name in names:
                if name.split(".")[0] in ours:
                    found.setdefault(module.name, []).append(name)
    assert found == {}
    assert len(list(PROTO.glob("*.py"))) >= 6  # the scan saw the contracts
