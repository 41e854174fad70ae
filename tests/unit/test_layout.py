"""House layout rules that a refactor could silently break."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    names |= {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    return names


def test_methods_never_import_callbacks_or_datamodules() -> None:
    """Imports run one way: a method (lightning_modules/) never reaches back into callbacks/ or datamodules/."""
    offending = {
        str(path.relative_to(REPO)): sorted(m for m in imported_modules(path)
                                            if m.startswith(("fsad.callbacks", "fsad.datamodules")))
        for path in (REPO / "lightning_modules").rglob("*.py")
    }  # fmt: skip
    checked = len(offending)
    offending = {file: modules for file, modules in offending.items() if modules}
    assert checked > 10 and not offending, offending
