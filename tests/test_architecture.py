"""The code's shape, checked: no import circles among infra/, flows/ and tasks/ (every import counts,
deferred and TYPE_CHECKING ones too: a circle dodged by a late import is still a circle), no Prefect
under infra/, and no module past the size a reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("infra", "flows", "tasks")
MAX_LINES = 420  # "a few hundred lines": past this a module mixes things a reader must hold apart


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module → the project modules it imports (a `from pkg import name` names the submodule when
    pkg.name is one, else the package)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join([*pkg, *([base] if base else [])])
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circle():
    found = circles(import_graph())
    assert not found, ("import circles (cut them by moving the shared names down a layer, not with a late import): "
                       + "; ".join(" ↔ ".join(c) for c in found))


def test_the_circle_check_finds_a_circle():
    # The check itself can fail: a two-module loop and a three-module one are found, a chain is not.
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": set()}) == [["a", "b"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]


def test_infra_imports_no_prefect():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "infra").rglob("*.py")
                 if any(isinstance(n, (ast.Import, ast.ImportFrom))
                        and any((getattr(n, "module", None) or a.name).split(".")[0] == "prefect" for a in n.names)
                        for n in ast.walk(ast.parse(p.read_text())))]
    assert not offenders, f"infra/ must not import Prefect (flows/ sequences, tasks/ retry): {offenders}"


def test_no_module_is_longer_than_a_reader_takes_in():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by what they own): {long}"


def test_no_file_holds_a_merge_conflict_marker():
    # A half-resolved merge can leave markers in docs or a Makefile that no other test reads.
    markers = ("<" * 7 + " ", ">" * 7 + " ")
    found = [f"{p.relative_to(ROOT)}:{i}" for pattern in ("*.py", "*.md", "*.yaml", "*.sh", "*.tmpl", "Makefile")
             for p in ROOT.rglob(pattern) if not {".venv", ".cache", "node_modules", ".git"} & set(p.parts)
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if line.startswith(markers)]
    assert not found, f"merge conflict markers left in: {found}"
