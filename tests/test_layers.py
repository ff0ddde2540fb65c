"""Imports run one way: proto <- swarm <- {node, client} <- the command-line programs, tests, benchmarks.

Every import statement of every library module counts, also those inside functions (a function-level import
is still an arrow, it only hides it). The command-line programs live in their package (node/cli.py is
`node`, client/cli.py is `swarm`) and obey their package's rule; tests/ and bench/ may import anything.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("proto", "swarm", "node", "client", "tests", "bench")
ALLOWED = {  # package -> the packages of ours it may import
    "proto": {"proto"},
    "swarm": {"proto", "swarm"},
    "node": {"proto", "swarm", "node"},
    "client": {"proto", "swarm", "client"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package of ours, line) of every import in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in OURS}
    return found


def test_imports_run_one_way():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for target, line in sorted(imported_packages(path)):
                if target not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "imports against the direction proto <- swarm <- {node, client}:\n" + "\n".join(wrong)


def test_the_walk_sees_function_level_imports(tmp_path):
    """The check itself can fail: an import hidden inside a function is found."""
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\ndef f():\n    from client.model import X\n    import node.server\n")
    assert imported_packages(sample) == {("client", 4), ("node", 5)}
