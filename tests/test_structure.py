"""The package's shape: no import cycle between its modules (imports inside functions
included), and no method named outside its module and the registry."""

import ast
import os
import re

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'rdskd_jax')


def _modules():
  """{module name: path} of every module in the package."""
  found = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
        found['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return found


def _imports(path, modules):
  """The package's modules that the file at `path` imports, wherever the import stands."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:  # `from pkg import module` imports the module itself.
        name = f'{node.module}.{alias.name}'
        out.add(name if name in modules else node.module)
  return {m for m in out if m in modules}


def test_no_import_cycle():
  modules = _modules()
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  # A package's __init__ runs before its modules: importing one imports it too.
  for m in modules:
    if '.' in m[len('rdskd_jax.'):]:
      graph[m].add(m.rsplit('.', 1)[0])
  state, path = {}, []

  def visit(m):
    state[m] = 'open'
    path.append(m)
    for n in sorted(graph[m]):
      assert state.get(n) != 'open', 'import cycle: ' + ' -> '.join(path[path.index(n):] + [n])
      if n not in state:
        visit(n)
    path.pop()
    state[m] = 'done'

  for m in sorted(modules):
    if m not in state:
      visit(m)


def test_methods_are_named_only_in_their_modules_and_the_registry():
  methods_dir = os.path.join(PACKAGE, 'methods')
  pattern = re.compile(r"'(dafl|dfad|zskd|deepinversion|mskd)'")
  found = [f'{path}:{i}' for path in _modules().values()
           if not path.startswith(methods_dir)
           for i, line in enumerate(open(path), 1) if pattern.search(line)]
  assert not found
