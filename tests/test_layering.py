"""The package's imports run one way (style.md): cli -> builder/calibration/serve -> engine -> models -> layers ->
plugins, with processing/config/errors/formats/utils at the bottom; no module imports itself back through others.

Every import statement counts, those inside functions too (the CLI imports lazily, but a lazy import is still
a dependency of the code that runs it)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "autoglm_trt"

# The floor of each top-level package or module: an import may only go to the same floor or below.
LEVELS = {
    "cli": 6, "__main__": 6,
    "builder": 5, "calibration": 5, "serve": 5, "regress": 5, "generate": 5, "doctor": 5, "mini": 5,
    "engine": 4, "models": 3, "layers": 2, "plugins": 1,
    "processing": 0, "config": 0, "errors": 0, "formats": 0, "utils": 0, "": 0,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in `path` (`from a.b import c` counts a.b.c when c is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("autoglm_trt")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autoglm_trt"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return {m for m in out if m in modules}


def floor(module: str) -> tuple[str, int]:
    top = module.split(".")[1] if "." in module else ""
    assert top in LEVELS, f"{module}: new top-level package {top!r}: give it a floor in LEVELS (style.md's order)"
    return top, LEVELS[top]


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one node (iterative: the graph has a few hundred nodes)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(g.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def test_no_import_goes_up_a_floor():
    upward = []
    for src, targets in graph().items():
        (top, level) = floor(src)
        for dst in targets:
            dtop, dlevel = floor(dst)
            if dlevel > level:
                upward.append(f"{src} (floor {level}) imports {dst} (floor {dlevel})")
    assert not upward, "imports that go up:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
    cycles = strongly_connected(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_cycles_between_packages_of_one_floor():
    pkg = defaultdict(set)
    for src, targets in graph().items():
        for dst in targets:
            a, b = floor(src)[0], floor(dst)[0]
            if a != b:
                pkg[a].add(b)
    cycles = strongly_connected({k: set(v) for k, v in pkg.items()} | {k: set() for k in LEVELS if k not in pkg})
    assert not cycles, "packages that import each other:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_planted_cycle_and_an_upward_import(tmp_path):
    """The rules above are not vacuous: a cycle and an upward edge, planted in a copy of the graph, are found."""
    g = graph()
    assert any(g.values()), "no imports found: the parser is broken"
    planted = {k: set(v) for k, v in g.items()}
    planted["autoglm_trt.layers.linear"].add("autoglm_trt.models.loader")  # loader imports layers.linear
    assert any("autoglm_trt.layers.linear" in c for c in strongly_connected(planted))
    assert floor("autoglm_trt.layers.linear")[1] < floor("autoglm_trt.engine.llm_engine")[1]
