"""The package's shape, checked from the source: imports run one way, and backends stay in kernels/.

Read with `ast`, not by importing, so the checks cost nothing and see every import, including the
ones deferred into functions (a cycle through a deferred import still breaks whoever imports first).
"""

import ast
import pathlib

import pytest

from helpers import REPO

PACKAGE = pathlib.Path(REPO) / 'jaxsae'
# The kernel backends: only jaxsae/kernels/ may import or name them.
BACKEND_MODULES = ('dense', 'sparse', 'xla', 'pallas_gpu', 'pallas_tpu', 'cpu', 'cpu_build')
BACKEND_NAMES = ('dense', 'xla', 'pallas', 'pallas_gpu', 'pallas_tpu', 'cpu')


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The jaxsae modules `name` imports anywhere in its source (`from a import b` counts a.b when
  that is a module, else a)."""
  tree = ast.parse(path.read_text(), str(path))
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(
            package.split('.')[: len(package.split('.')) - node.level + 1]
            + ([base] if base else [])
        )
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in known:  # `import jaxsae.kernels.cpu as x` -> the module
        target = target.rpartition('.')[0]
      if target and target != name:
        out.add(target)
  return out


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  known = set(modules)
  graph = {name: _imports(name, path, known) for name, path in modules.items()}
  # Importing a.b.c runs a/__init__ and a/b/__init__ first: those edges are real too.
  for name in list(graph):
    parts = name.split('.')
    for i in range(1, len(parts)):
      parent = '.'.join(parts[:i])
      if parent in graph and parent != name:
        graph[name].add(parent)
  return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle_among_jaxsae_modules():
  graph = _graph()
  # A package's __init__ may import its own submodules (it is their public face); the check is
  # that nothing below imports back up into a module that imports it.
  for name in graph:
    graph[name] = {t for t in graph[name] if not t.startswith(name + '.')}
  assert _find_cycle(graph) is None, ' -> '.join(_find_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
  """The checker itself can fail."""
  assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _find_cycle({'a': {'b'}, 'b': set()}) is None


def test_only_kernels_imports_a_backend():
  graph = _graph()
  backends = {f'jaxsae.kernels.{m}' for m in BACKEND_MODULES}
  offenders = {
      name: sorted(deps & backends)
      for name, deps in graph.items()
      if not name.startswith('jaxsae.kernels') and deps & backends
  }
  assert not offenders, offenders


def _chooses_by_backend(node: ast.AST) -> bool:
  """`x.kernel == 'cpu'` or `kernel in ('xla', ...)`: code choosing by a backend's name."""
  if not isinstance(node, ast.Compare):
    return False
  sides = [node.left, *node.comparators]
  names_kernel = any(
      isinstance(s, ast.Attribute)
      and s.attr == 'kernel'
      or isinstance(s, ast.Name)
      and s.id == 'kernel'
      for s in sides
  )
  constants = [s.value for s in sides if isinstance(s, ast.Constant)]
  for s in sides:
    if isinstance(s, (ast.Tuple, ast.List, ast.Set)):
      constants += [e.value for e in s.elts if isinstance(e, ast.Constant)]
  return names_kernel and any(c in BACKEND_NAMES for c in constants)


def _backend_choices(path: pathlib.Path) -> list[str]:
  tree = ast.parse(path.read_text(), str(path))
  return [f'{path}:{node.lineno}' for node in ast.walk(tree) if _chooses_by_backend(node)]


def test_no_module_outside_kernels_chooses_by_backend_name():
  offenders = [
      hit
      for name, path in _modules().items()
      if not name.startswith('jaxsae.kernels')
      for hit in _backend_choices(path)
  ]
  assert not offenders, offenders


def test_the_backend_name_check_finds_one(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text("if sc.kernel == 'cpu':\n  pass\nif kernel in ('xla', 'dense'):\n  pass\n")
  assert len(_backend_choices(bad)) == 2


@pytest.mark.parametrize('root', ['jaxsae', 'tools', 'benchmarks', 'experiments', 'tests'])
def test_nothing_points_outside_the_repository(root):
  """The project stands on its own: no source file cites a path beside the checkout."""
  hits = [
      f'{p.relative_to(REPO)}:{i}'
      for p in sorted((pathlib.Path(REPO) / root).rglob('*'))
      if p.suffix in ('.py', '.sh', '.cc', '.js', '.css') and p.name != 'test_layout.py'
      for i, line in enumerate(p.read_text(errors='replace').splitlines(), 1)
      if '../shared' in line or 'DESIGN.md' in line
  ]
  assert not hits, hits
