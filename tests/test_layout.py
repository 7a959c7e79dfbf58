"""The package's layout rules, checked on its source: no two modules import each other (directly or in a circle,
lazy imports inside functions included), and nothing outside the test fleet imports the test fleet."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

PACKAGE = Path(__file__).resolve().parents[1] / "torchx_diloco"


def module_imports(root: Path = PACKAGE) -> Dict[str, Set[str]]:
    """Every module of the package (dotted) -> the package's modules it imports anywhere in its file."""
    files = {
        ".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): f
        for f in root.rglob("*.py")
    }
    edges: Dict[str, Set[str]] = {}
    for name, path in files.items():
        found: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        edges[name] = {m for m in found if m in files and m not in (name, root.name)}
    return edges


def find_cycle(edges: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(u: str) -> Optional[List[str]]:
        state[u] = 1
        path.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                return path[path.index(v) :] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        path.pop()
        state[u] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_module_of_the_package_imports_another_in_a_circle():
    cycle = find_cycle(module_imports())
    assert cycle is None, f"an import cycle: {' -> '.join(cycle or [])} (a shared piece wants a module of its own)"


def test_the_cycle_check_finds_a_circle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    import pkg.a\n")  # lazy: still a cycle
    assert find_cycle(module_imports(pkg)) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("x = 1\n")
    assert find_cycle(module_imports(pkg)) is None


def test_only_the_fleet_imports_the_fleet():
    """The test fleet (torchx_diloco/_fleet: processes, faulty://, network namespaces, chaos) is not in the wheel:
    no module the package ships may import it."""
    offenders = {
        m: sorted(t for t in targets if t.startswith("torchx_diloco._fleet"))
        for m, targets in module_imports().items()
        if not m.startswith("torchx_diloco._fleet")
    }
    assert not {m: t for m, t in offenders.items() if t}, offenders
