"""The package's shape: the import graph of mmfree_jax/ has no cycle and no import from a
lower layer into a higher one (the order below, read from the data flow), and no module is
longer than MAX_LINES. Read from the source (every import, also those inside functions), so
nothing is imported here."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "mmfree_jax"
MAX_LINES = 450

# Bottom to top; a module may import its own layer and those below it. The most specific
# prefix decides; every CLI `__main__` and the top-level CLIs are entry points (the top).
LAYERS = (
    ("foundation", ("mmfree_jax.cli", "mmfree_jax.config")),
    ("devices", ("mmfree_jax.sharding", "mmfree_jax.multihost")),
    ("data", ("mmfree_jax.data",)),
    ("layers", ("mmfree_jax.layers",)),
    ("model", ("mmfree_jax.models", "mmfree_jax.flops")),
    ("train", ("mmfree_jax.train",)),
    ("interop", ("mmfree_jax.interop",)),
    ("infer", ("mmfree_jax.infer",)),
    ("evaluation", ("mmfree_jax.evaluation",)),
    ("scaling", ("mmfree_jax.scaling",)),
    ("tools", ("mmfree_jax.sweep", "mmfree_jax.aot", "mmfree_jax.hlo_stats", "mmfree_jax.bench")),
    ("entry points", ("mmfree_jax.convert", "mmfree_jax.generate")),
)
ENTRY = len(LAYERS) - 1


def _modules() -> dict[str, str]:
  """Module name -> file, for every .py under mmfree_jax/."""
  out = {}
  for d, _, files in os.walk(os.path.join(ROOT, PKG)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(d, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def layer(module: str) -> int:
  if module == PKG:
    return 0
  if module.endswith(".__main__"):
    return ENTRY
  best = None
  for i, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
        best = (i, len(p))
  if best is None:
    raise AssertionError(f"{module} has no layer in tests/test_layout.py: add it to LAYERS")
  return best[0]


def _imports(module: str) -> set[str]:
  """The mmfree_jax modules `module` imports, anywhere in its file."""
  path = MODULES[module]
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
      continue
    for name in names:
      while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
      if name in MODULES and name != module:
        out.add(name)
  return out


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
  for m in MODULES:
    layer(m)


def test_no_import_goes_up_a_layer():
  up = [f"{m} ({LAYERS[layer(m)][0]}) imports {d} ({LAYERS[layer(d)][0]})"
        for m, deps in sorted(GRAPH.items()) for d in sorted(deps) if layer(d) > layer(m)]
  assert not up, "\n".join(up)


def test_the_import_graph_has_no_cycle():
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(m: str):
    state[m] = 1
    path.append(m)
    for d in sorted(GRAPH[m]):
      if state.get(d) == 1:
        pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
      if d not in state:
        visit(d)
    path.pop()
    state[m] = 2

  for m in sorted(GRAPH):
    if m not in state:
      visit(m)


def test_the_checks_see_imports_and_cycles():
  """The graph holds known edges (absolute, relative-free, inside functions)."""
  assert "mmfree_jax.models" in GRAPH["mmfree_jax.flops"]
  assert "mmfree_jax.train.setup" in GRAPH["mmfree_jax.scaling.results"]  # inside a function
  assert layer("mmfree_jax.train.__main__") == ENTRY
  assert layer("mmfree_jax.layers.bitlinear") < layer("mmfree_jax.models") < layer(
      "mmfree_jax.train.loop")


def test_no_module_is_longer_than_the_limit():
  long = {os.path.relpath(p, ROOT): n for p in MODULES.values()
          if (n := sum(1 for _ in open(p))) > MAX_LINES}
  assert not long, f"over {MAX_LINES} lines: {long}"
