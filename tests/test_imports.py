"""The import structure of `small4_jax`, `infer` and `train`, read from the source (AST, function-local imports
included), nothing imported: no cycle between modules, no private name (`_x`) of another module used, each module
importing only its own layer and the layers below it (`LAYERS`), and function-local first-party imports only in the
command-line modules that must answer `--help` before importing JAX (`LAZY`).

`LAYERS` is the source of truth for the import direction; each package's `__init__.py` says the same in words.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("small4_jax", "infer", "train")

# Low to high: a module may import modules of its own layer and of the layers before it. A module's layer is that of
# the longest prefix listed (a package name covers its modules).
LAYERS = [
    ("core", ["small4_jax.errors", "small4_jax.runtime", "small4_jax.config", "small4_jax.platform",
              "small4_jax.console"]),
    ("leaves: placement on meshes, tokens and images, quantised formats, the batch sampler, the safetensors reader",
     ["small4_jax.parallel", "small4_jax.inputs", "small4_jax.quant", "small4_jax.decode.sampler",
      "small4_jax.ckpt.safetensors_io"]),
    ("kernels", ["small4_jax.kernels"]),
    ("model math", ["small4_jax.nn"]),
    ("adapters, calibrated quantisation", ["small4_jax.lora", "small4_jax.quant.calibration"]),
    ("checkpoints", ["small4_jax.ckpt"]),
    ("the Python API's decoding", ["small4_jax.decode"]),
    ("the public API", ["small4_jax"]),
    ("serving: engine, speculative decoding, structured output, server, command line", ["infer"]),
    ("training (GRPO samples with the serving engine)", ["train"]),
    ("tools (deviceless compiles of the serving and training programs, conversion)",
     ["small4_jax.tools", "small4_jax.aot", "small4_jax.convert", "small4_jax.distributed", "small4_jax.plan"]),
]
# Inside `infer`, the engine is below what drives it.
INFER_ORDER = ["infer.chat", "infer.structured", "infer.engine", "infer.speculative", "infer.batch", "infer.server",
               "infer.cli", "infer.generate", "infer.serve"]

# Modules whose first-party imports may stay inside functions, and why.
LAZY = {
    "small4_jax": "PEP 562: `import small4_jax.errors` (every CLI, before parsing flags) must not import JAX",
    "small4_jax.parallel.distributed": "`python -m small4_jax.distributed --help` answers without importing JAX",
    "small4_jax.tools.convert": "`python -m small4_jax.convert --help` / bad flags answer without importing JAX",
    "infer.cli": "shared by the CLIs below: `--help` and flag errors come before JAX is imported",
    "infer.generate": "`python -m infer.generate --help` answers without importing JAX",
    "infer.serve": "`python -m infer.serve --help` answers without importing JAX",
    "train.finetune": "`python -m train.finetune --help` answers without importing JAX",
    "train.validate_data": "`python -m train.validate_data --help` answers without importing JAX",
    "train.export": "`python -m train.export --help` answers without importing JAX",
}
# The `python -m` aliases of moved command-line modules: nothing may import them.
CLI_ALIASES = ("small4_jax.aot", "small4_jax.convert", "small4_jax.distributed", "small4_jax.plan")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            if "assets" in rel.parts:
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {m: ast.parse(p.read_text()) for m, p in MODULES.items()}


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str):
    """(imported module, names taken from it, line, function-local) of every first-party import of `module`."""
    tree = TREES[module]
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node

    def local(node) -> bool:
        while hasattr(node, "parent"):
            node = node.parent
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return True
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _resolve(a.name)
                if target and a.name.split(".")[0] in PACKAGES:
                    yield target, (), node.lineno, local(node)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in MODULES:  # `from package import module`
                    yield sub, (), node.lineno, local(node)
                else:
                    yield _resolve(node.module), (a.name,), node.lineno, local(node)


GRAPH = {m: [(t, names, line, lazy) for t, names, line, lazy in _imports(m) if t != m] for m in MODULES}


def _layer(module: str) -> tuple[int, int]:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module}: in no layer of LAYERS"
    sub = next((j for j, p in enumerate(INFER_ORDER) if module == p or module.startswith(p + ".")), 0)
    return rank, sub


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_no_import_cycles():
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, *_ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_go_down_the_layers():
    bad = []
    for m, edges in GRAPH.items():
        for target, _, line, _ in edges:
            if target in CLI_ALIASES:
                bad.append(f"{MODULES[m].relative_to(REPO)}:{line}: imports the `python -m` alias {target}")
            elif _layer(target) > _layer(m):
                bad.append(f"{MODULES[m].relative_to(REPO)}:{line}: {m} ({LAYERS[_layer(m)[0]][0]}) imports {target} "
                           f"({LAYERS[_layer(target)[0]][0]}), a layer above it")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = [f"{MODULES[m].relative_to(REPO)}:{line}: {m} imports {name} from {target}"
           for m, edges in GRAPH.items() for target, names, line, _ in edges for name in names
           if name.startswith("_") and not name.startswith("__")]
    # attribute access: module._x, and obj._x where _x is a member defined in another module only
    defined: dict[str, set[str]] = {}
    for m, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.startswith("_"):
                defined.setdefault(node.name, set()).add(m)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name)
                  and node.value.id == "self" and node.attr.startswith("_")):
                defined.setdefault(node.attr, set()).add(m)
    for m, path in MODULES.items():
        for node in ast.walk(TREES[m]):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id not in ("self", "cls")
                    and node.attr in defined and m not in defined[node.attr]):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {m} uses {node.value.id}.{node.attr}, private to "
                           f"{sorted(defined[node.attr])}")
    assert not bad, "\n".join(bad)


def test_function_local_imports_only_where_listed():
    bad = [f"{MODULES[m].relative_to(REPO)}:{line}: {m} imports {target} inside a function"
           for m, edges in GRAPH.items() for target, _, line, lazy in edges if lazy and m not in LAZY]
    assert not bad, "\n".join(bad) + "\n(move it to the top, or list the module in LAZY with its reason)"
    assert set(LAZY) <= set(MODULES)
