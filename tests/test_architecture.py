"""The layering of curvop/ (docs/architecture.md), checked on the module import graph.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``, at the top
of a module or inside a function (a lazy import is a dependency too). Nodes are curvop's modules;
``from curvop.x import y`` is an edge to ``curvop.x.y`` when that is a module, else to ``curvop.x``.
The parent packages a dotted import runs implicitly are not edges (every module would then depend
on ``curvop/__init__.py``, which imports everything public).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "curvop"

#: the algorithm layer: written once, framework-free, on HessianOperator and the array layer
ALGORITHMS = ("curvop.eigen", "curvop.density", "curvop.krylov", "curvop.sketch", "curvop.trace_estimation",
              "curvop.diagonal_estimation", "curvop.inversion", "curvop._checks")
#: what the backend layer must never import (the layers above it)
ABOVE_BACKENDS = ALGORITHMS + ("curvop.operator", "curvop.cli", "curvop.studies", "curvop.plot",
                               "curvop.tracking", "curvop.tracking_keras", "curvop.factory")
FRAMEWORKS = ("torch", "tensorflow", "jax", "cupy", "cupyx", "keras", "flax")

#: Known offending edges in modules this change does not own, each with who removes it. The lead
#: empties this list at merge; a new offending edge fails the test.
ALLOWED: dict[tuple[str, str], str] = {
    # empty: every edge that needed an exception was fixed when the branches were merged
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest curvop module that ``name`` names or lies in (``None`` outside curvop)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported curvop module: line of the first such import}."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for mod, path in modules.items():
        edges: dict[str, int] = {}
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                r = _resolve(t, modules) if t.split(".")[0] == "curvop" else None
                if r is not None and r != mod:
                    edges.setdefault(r, node.lineno)
        graph[mod] = edges
    return graph


def external_imports(mod: str) -> set[str]:
    """Top-level names of the non-curvop packages ``mod`` imports (anywhere in the file)."""
    out = set()
    for node in ast.walk(ast.parse(_modules()[mod].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out - {"curvop"}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, {})))))
                path.append(nxt)
    return None


def _is_under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _report(bad: list[tuple[str, str, int]]) -> str:
    return "\n".join(f"  {a} -> {b}  ({_modules()[a].relative_to(ROOT.parent)}:{line})" for a, b, line in bad)


GRAPH = import_graph()


def test_import_graph_is_acyclic():
    graph = {a: {b: line for b, line in edges.items() if (a, b) not in ALLOWED} for a, edges in GRAPH.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + "\n" + _report(
        [(a, b, GRAPH[a][b]) for a, b in zip(cycle, cycle[1:])])


def test_algorithms_import_no_backend_and_no_framework():
    bad = [(a, b, line) for a in GRAPH if _is_under(a, ALGORITHMS) for b, line in GRAPH[a].items()
           if _is_under(b, ("curvop.backends",)) and (a, b) not in ALLOWED]
    assert not bad, "algorithm modules import backends:\n" + _report(bad)
    for a in GRAPH:
        if _is_under(a, ALGORITHMS):
            assert not external_imports(a) & set(FRAMEWORKS), f"{a} names a framework"


def test_backends_never_import_the_layers_above():
    bad = [(a, b, line) for a in GRAPH if _is_under(a, ("curvop.backends",)) for b, line in GRAPH[a].items()
           if (_is_under(b, ABOVE_BACKENDS) or b == "curvop") and (a, b) not in ALLOWED]
    assert not bad, "backends import layers above them:\n" + _report(bad)


def test_lower_layers_import_no_backend_module_above_the_contract():
    """The array layer, dtypes and progress bars sit below the backends (``_progress`` used to import
    ``backends.distributed``: every algorithm then depended on torch.distributed's module)."""
    low = ("curvop.arrays", "curvop._dtypes", "curvop._errors", "curvop._progress", "curvop._tf_array",
           "curvop._checks")
    bad = [(a, b, line) for a in low for b, line in GRAPH.get(a, {}).items()
           if _is_under(b, ("curvop.backends",) + ABOVE_BACKENDS) and (a, b) not in ALLOWED]
    assert not bad, "low-level modules import upward:\n" + _report(bad)


def test_allow_list_has_no_stale_entries():
    stale = [edge for edge in ALLOWED if edge[1] not in GRAPH.get(edge[0], {})]
    assert not stale, f"allow-listed edges no longer exist, remove them: {stale}"


#: the template layer: the top level of backends/, framework-free (the registry finds the frameworks)
TEMPLATE = ("curvop.backends", "curvop.backends.base", "curvop.backends.template", "curvop.backends.checks",
            "curvop.backends.dataset", "curvop.backends.faults", "curvop.backends.modes", "curvop.backends.selection",
            "curvop.backends.selfcheck", "curvop.backends.array", "curvop.backends.callables",
            "curvop.backends.curvature")
#: one package per multi-file framework, and the single-file ones
FRAMEWORK_PACKAGES = ("curvop.backends.torch", "curvop.backends.jax", "curvop.backends.tensorflow",
                      "curvop.backends.cupy")
#: what a framework package may import besides the template layer and its own modules
BELOW_BACKENDS = ("curvop.arrays", "curvop._dtypes", "curvop._errors")


def _package_of(mod: str) -> str | None:
    return next((p for p in FRAMEWORK_PACKAGES if _is_under(mod, (p,))), None)


def test_backends_top_level_is_the_template_layer():
    """Every module at the top of backends/ is the template layer or a single-file framework backend."""
    top = {m for m in GRAPH if m.startswith("curvop.backends") and m.count(".") <= 2}
    assert top - set(TEMPLATE) - set(FRAMEWORK_PACKAGES) == set(), "unclassified modules in backends/"


def test_template_layer_imports_no_framework_and_no_framework_package():
    """The template layer names no framework (not even lazily) and imports no framework package:
    frameworks are found by name through the registry (``curvop.backends.get``)."""
    for mod in TEMPLATE + ("curvop._dtypes",):
        assert not external_imports(mod) & set(FRAMEWORKS), f"{mod} imports a framework"
        bad = [(mod, b, line) for b, line in GRAPH[mod].items() if _package_of(b) and (mod, b) not in ALLOWED]
        assert not bad, "the template layer imports a framework package:\n" + _report(bad)


def test_framework_packages_import_only_the_template_their_own_and_the_array_layer():
    bad = []
    for a, edges in GRAPH.items():
        own = _package_of(a)
        if own is None:
            continue
        for b, line in edges.items():
            if not (_is_under(b, (own,)) or b in TEMPLATE or b in BELOW_BACKENDS) and (a, b) not in ALLOWED:
                bad.append((a, b, line))
    assert not bad, "framework packages import outside the template layer and their own package:\n" + _report(bad)


def test_framework_packages_are_folders():
    """torch, JAX and TensorFlow are packages under backends/ (issue 25); no ``_torch_*`` files remain."""
    for name in ("torch", "jax", "tensorflow"):
        assert (ROOT / "backends" / name / "__init__.py").is_file()
    assert not [p.name for p in (ROOT / "backends").glob("_*.py") if p.name != "__init__.py"]


@pytest.mark.parametrize("edges, cycle", [
    ({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}, ["a", "b", "c", "a"]),
    ({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}, None),
])
def test_find_cycle_itself(edges, cycle):
    assert find_cycle(edges) == cycle
