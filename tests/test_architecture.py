"""The import graph shows the architecture: layers only import downwards, no cycles, and imports
inside functions only for heavy optional dependencies (loaded lazily on purpose)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]

# Lowest first: a module may import its own layer or the layers before it, never a later one.
LAYERS = [
    ("graphprune.errors", "graphprune.arguments", "graphprune.timing"),
    ("graphprune.ir",),
    ("graphprune.rules",),
    ("graphprune.analysis",),
    ("graphprune.pipeline",),
    ("graphprune.passes",),
    ("graphprune.backends", "graphprune.writeback", "graphprune.hf", "graphprune.vocab", "graphprune.memo"),
    ("graphprune.compile",),
    (
        "graphprune.summary",
        "graphprune.saving",
        "graphprune.schedule",
        "graphprune.sensitivity",
        "graphprune.search",
        "graphprune.recipe",
        "graphprune.recipe_schema",
        "graphprune.regularize",
        "graphprune.finetune",
    ),
    ("graphprune.sources",),
    ("graphprune", "graphprune.cli"),  # the package's public API and the command line
]
LAZY_OK = {"onnx", "onnxruntime", "tokenizers", "matplotlib", "torchvision", "transformers", "timm", "optuna"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("passes", "backends"):  # installed as graphprune.passes / graphprune.backends
        parts = ["graphprune", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
    files = [p for folder in ("graphprune", "passes", "backends") for p in (ROOT / folder).rglob("*.py")]
    return {_module_name(p): ast.parse(p.read_text()) for p in files}


def _imported(node: ast.stmt, modules: set[str]) -> set[str]:
    if isinstance(node, ast.ImportFrom) and node.module:
        return {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    return set()


def _layer(module: str) -> int:
    best = max(
        (prefix for layer in LAYERS for prefix in layer if module == prefix or module.startswith(prefix + ".")), key=len
    )
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def _graph() -> nx.DiGraph:
    sources = _sources()
    graph = nx.DiGraph()
    for module, tree in sources.items():
        graph.add_node(module)
        for node in tree.body:
            for target in _imported(node, set(sources)):
                if target in sources and target != module:
                    graph.add_edge(module, target)
    return graph


def test_layers_only_import_downwards():
    upward = [(a, b) for a, b in _graph().edges if _layer(b) > _layer(a)]
    assert not upward, f"imports from a lower layer into a higher one: {upward}"


def test_no_import_cycles():
    graph = _graph()
    graph.remove_node("graphprune")  # the package __init__ only gathers the public API
    assert nx.is_directed_acyclic_graph(graph), f"import cycle: {nx.find_cycle(graph)}"


def test_imports_inside_functions_are_only_heavy_optional_dependencies():
    lazy = []
    for module, tree in _sources().items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    for name in _imported(node, set()) if isinstance(node, (ast.Import, ast.ImportFrom)) else ():
                        if name.split(".")[0] not in LAZY_OK:
                            lazy.append(f"{module}.{fn.name}: {name}")
    assert not lazy, f"imports inside functions (move them to the top of the module): {lazy}"


def test_the_check_sees_an_upward_import():
    assert _layer("graphprune.ir.masking") < _layer("graphprune.passes.mask") < _layer("graphprune.compile")
    assert ("graphprune.passes.mask", "graphprune.pipeline") in _graph().edges


def test_the_library_never_imports_ultralytics():
    """Ultralytics is AGPL: tests and benchmarks may use it (the `test`/`yolo` extras), the library may not."""
    offenders = [
        name
        for name, tree in _sources().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(m == "ultralytics" or m.startswith("ultralytics.") for m in _imported(node, set()))
    ]
    assert not offenders
