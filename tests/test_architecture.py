"""The house rules of docs/architecture.md, read from the source with ast (every import, also the
ones inside functions): no import cycle; dependencies point one way, cache/ ← pipeline/ ← stages/;
cache/ imports no torch; a stage imports no other stage, except the documented exceptions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"cache": 0, "pipeline": 1, "stages": 2}
# docs/architecture.md, "Dependencies": stages/config.py assembles the stages' config sections,
# stages/demo.py drives the stages' run(), stages/train_setup.py is the train stage's setup.
STAGE_EXCEPTIONS = {
    "stages.config": {"stages.cache_teacher", "stages.evaluate", "stages.init_student", "stages.train_student"},
    "stages.demo": {"stages.cache_teacher", "stages.config", "stages.evaluate", "stages.inspect_cache",
                    "stages.prepare", "stages.train_student"},
    "stages.train_student": {"stages.train_setup"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def imported(tree: ast.Module, name: str, is_package: bool) -> list[str]:
    """Every module an ``import`` or ``from ... import`` anywhere in the file names (``from a import b``:
    a.b where that is a module, else a; relative imports resolved)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module
            out += [parent] + [f"{parent}.{alias.name}" for alias in node.names]
    return out


def project_edges() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, path in mods.items():
        targets = imported(ast.parse(path.read_text()), name, path.name == "__init__.py")
        # `from a import b` where b is a module: the edge is to a.b, not to the package a
        edges[name] = {t for t in targets if t in mods and not any(u.startswith(t + ".") and u in mods
                                                                  for u in targets)} - {name}
    return edges


def third_party(layer: str) -> dict[str, set[str]]:
    mods = modules()
    return {name: {t.split(".")[0] for t in imported(ast.parse(path.read_text()), name, path.name == "__init__.py")}
            for name, path in mods.items() if name.split(".")[0] == layer}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_every_import():
    """The checks below see imports inside functions, relative ones and `from package import module`."""
    tree = ast.parse("def f():\n    from stages import prepare, status\nfrom . import x\n")
    assert {"stages.prepare", "stages.status", "pipeline.teachers.x"} <= set(imported(tree, "pipeline.teachers.y", False))
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    edges = project_edges()
    assert "stages.train_setup" in edges["stages.train_student"] and "pipeline.run_paths" in edges["stages.evaluate"]


def test_no_import_cycle():
    assert cycles(project_edges()) == []


def test_dependencies_point_one_way():
    upward = [(a, b) for a, targets in project_edges().items() for b in sorted(targets)
              if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]]
    assert upward == [], "cache/ ← pipeline/ ← stages/: move the helper down (docs/architecture.md)"


def test_a_stage_imports_no_other_stage():
    crossing = [(a, b) for a, targets in project_edges().items() if a.startswith("stages.") for b in sorted(targets)
                if b.startswith("stages.") and b not in STAGE_EXCEPTIONS.get(a, set())]
    assert crossing == [], "stage-shared helpers live in pipeline/ (docs/architecture.md)"


def test_cache_imports_no_torch():
    with_torch = [name for name, packages in third_party("cache").items() if packages & {"torch", "accelerate"}]
    assert with_torch == []
    # and nothing it imports pulls torch in behind its back
    cache_modules = [name for name in modules() if name.startswith("cache.")]
    code = f"import sys; import {', '.join(cache_modules)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_choosing_the_hf_teacher_does_not_import_vllm():
    """TEACHERS maps names to classes; the vLLM one is imported only when chosen."""
    code = ("import sys; from pipeline.teachers.backends import TEACHERS; from pipeline.teachers.hf import HFTeacher; "
            "assert TEACHERS['hf'] is HFTeacher; print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
