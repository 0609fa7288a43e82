"""The package's layering, checked from the source's import statements (no module is imported).

adapters -> runtime -> {guidance, schedulers, parallel} -> kernels; the leaf modules (errors, choices, steps)
import nothing from pycfg and may be imported from anywhere but kernels; kernels import nothing from pycfg.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEAVES = {"errors", "choices", "steps"}
#: what each layer may import from pycfg (besides itself and the leaves)
ALLOWED = {
    "kernels": set(),
    "guidance": {"kernels"},
    "schedulers": {"kernels"},
    "parallel": {"kernels"},
    "runtime": {"guidance", "schedulers", "parallel", "kernels"},
    "adapters": {"runtime", "guidance", "schedulers", "parallel", "kernels"},
}


def _package_files():
    for path in sorted((ROOT / "pycfg").rglob("*.py")):
        yield path, ("pycfg",) + path.relative_to(ROOT / "pycfg").with_suffix("").parts
    # kernels/ is installed as pycfg.kernels
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        yield path, ("pycfg", "kernels") + path.relative_to(ROOT / "kernels").with_suffix("").parts


def _imported(path: Path, module: tuple[str, ...]) -> set[tuple[str, ...]]:
    """Every pycfg module ``path`` imports (at any depth of the file), as a tuple of names."""
    package = module[:-1] if module[-1] != "__init__" else module[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(tuple(a.name.split(".")) for a in node.names if a.name.split(".")[0] == "pycfg")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + tuple(node.module.split(".")) if node.module else base
            elif node.module and node.module.split(".")[0] == "pycfg":
                target = tuple(node.module.split("."))
            else:
                continue
            found.add(target)
    return found


def _layer(module: tuple[str, ...]) -> str | None:
    return module[1] if len(module) > 1 else None


def test_no_upward_imports():
    problems = []
    for path, module in _package_files():
        if module[-1] == "__init__" and len(module) == 2:
            continue  # pycfg/__init__.py: the public API
        layer = _layer(module)
        for target in _imported(path, module):
            other = _layer(target)
            if other is None or other == layer:
                continue
            if layer in LEAVES:
                problems.append(f"{'.'.join(module)} (a leaf) imports {'.'.join(target)}")
            elif layer == "kernels":
                problems.append(f"{'.'.join(module)} imports {'.'.join(target)}: kernels import nothing from pycfg")
            elif layer in ALLOWED and other not in ALLOWED[layer] and other not in LEAVES:
                problems.append(f"{'.'.join(module)} ({layer}) imports {'.'.join(target)} ({other})")
    assert not problems, "\n".join(problems)


def test_the_check_sees_imports():
    # the parser resolves relative imports: a guard against a check that passes because it sees nothing
    path = ROOT / "pycfg" / "runtime" / "graphs.py"
    found = _imported(path, ("pycfg", "runtime", "graphs"))
    assert ("pycfg", "schedulers", "update") in found and ("pycfg", "runtime", "denoise") in found
