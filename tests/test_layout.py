"""The layout is the architecture, checked: each room imports only what it may.

- `proto/` (the wire contracts) imports nothing of ours;
- each service (`services/<name>/`) imports its own package, `proto` and `vitrine`'s shared
  libraries, never another service;
- nothing a service links (`vitrine/` outside `vitrine/cli/`) imports the operator's tools.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"vitrine", "services", "tests", "benchmarks", "proto"}


def imports(path: Path) -> Iterator[str]:
    """Every module a file imports (at any depth, lazy imports inside functions too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def violations(files: list[Path], allowed: tuple[str, ...]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in files:
        for name in imports(path):
            ours = name.split(".")[0] in OURS
            if ours and not any(name == a or name.startswith(a + ".") for a in allowed):
                found.setdefault(str(path.relative_to(ROOT)), []).append(name)
    return found


def test_proto_imports_nothing_of_ours_but_proto() -> None:
    files = sorted((ROOT / "proto").glob("*.py"))
    assert len(files) >= 6  # the scan saw the contracts
    assert violations(files, ("proto",)) == {}


def test_a_service_imports_its_own_package_the_contracts_and_the_shared_libraries() -> None:
    services = sorted(p for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists())
    assert {p.name for p in services} >= {"encoder", "router", "shard"}
    for service in services:
        files = sorted(service.rglob("*.py"))
        allowed = (f"services.{service.name}", "proto", "vitrine", "services")
        assert violations(files, allowed) == {}, service.name
        cross = {
            str(path.relative_to(ROOT)): name
            for path in files for name in imports(path)
            if name.startswith("services.") and not name.startswith(f"services.{service.name}")
        }
        assert cross == {}, f"{service.name} imports another service"
        tools = {
            str(path.relative_to(ROOT)): name
            for path in files for name in imports(path) if name.startswith("vitrine.cli")
        }
        assert tools == {}, f"{service.name} imports the operator's tools"


def test_the_shared_libraries_never_import_the_tools() -> None:
    libraries = sorted(
        p for p in (ROOT / "vitrine").rglob("*.py") if "cli" not in p.relative_to(ROOT).parts
    )
    assert any(p.name == "service.py" for p in libraries)
    found = {
        str(path.relative_to(ROOT)): name
        for path in libraries for name in imports(path)
        if name.startswith("vitrine.cli") or name.startswith("services")
    }
    assert found == {}
