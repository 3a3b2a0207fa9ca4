"""The package's floors (docs/architecture.md): every import of an `lm` module, at module level
or inside a function, runs down a floor or within its own package; no import cycles; nothing
imports a command; only commands import `lm.cli`; `launch/` imports only `lm.config` and
`lm.parallel`. Read from the source with `ast`, nothing imported."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# a lower floor never imports a higher one; packages on one floor never import each other
FLOORS = {'config': 1, 'model': 1,
          'parallel': 2, 'compress': 2,
          'data': 3, 'objectives': 3, 'inference': 3,
          'training': 4,
          'interop': 5, 'planning': 5, 'analysis': 5, 'tasks': 5, 'tools': 5}
COMMAND_FLOOR = 6   # modules directly in lm/ (cli.py among them: shared by commands only)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules(directory: str) -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted((ROOT / directory).rglob('*.py'))}


LM = _modules('lm')


def _imports(name: str, path: pathlib.Path) -> set[str]:
  """The `lm` modules that the file imports, anywhere in it (`from lm.x import y` counts as
  lm.x.y where that is a module, else lm.x)."""
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      candidates = [[a.name] for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
        base = f'{anchor}.{base}'.rstrip('.')
      candidates = [[f'{base}.{a.name}', base] for a in node.names]
    else:
      continue
    for options in candidates:
      for option in options:
        while option and option not in LM:
          option = option.rpartition('.')[0]
        if option.startswith('lm.') or option == 'lm':
          if option != 'lm':
            found.add(option)
          break
  return found


GRAPH = {name: _imports(name, path) - {name} for name, path in LM.items()}


def _floor(name: str) -> tuple[int, str]:
  """(floor, package) of an lm module."""
  parts = name.split('.')
  if len(parts) == 2 and parts[1] not in FLOORS:
    return COMMAND_FLOOR, name
  return FLOORS[parts[1]], parts[1]


def test_every_module_lives_on_a_floor():
  unplaced = [n for n in LM if n != 'lm' and n.count('.') >= 1
              and n.split('.')[1] not in FLOORS and (ROOT / 'lm' / n.split('.')[1]).is_dir()]
  assert not unplaced, f'packages missing from FLOORS (and docs/architecture.md): {unplaced}'
  commands = sorted(n for n in LM if n != 'lm' and _floor(n)[0] == COMMAND_FLOOR)
  for name in commands:   # a command is a module directly in lm/, never a package
    assert LM[name].parent == ROOT / 'lm', name


def test_imports_run_down_the_floors():
  upward = []
  for source, targets in GRAPH.items():
    if source == 'lm':
      continue
    floor, package = _floor(source)
    for target in targets:
      target_floor, target_package = _floor(target)
      if target_floor == COMMAND_FLOOR and target != 'lm.cli':
        upward.append(f'{source} imports the command {target}')
      elif target == 'lm.cli' and floor != COMMAND_FLOOR:
        upward.append(f'{source} imports lm.cli (only commands may)')
      elif target_floor > floor or (target_floor == floor and target_package != package
                                    and floor != COMMAND_FLOOR):
        upward.append(f'{source} (floor {floor}) imports {target} (floor {target_floor})')
  assert not upward, '\n'.join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle through each strongly connected component of more than one module (Tarjan)."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
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
        components.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return components


def test_no_import_cycles():
  assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  assert _cycles({'a': {'b'}, 'b': set()}) == []


@pytest.mark.parametrize('source', sorted(_modules('launch')))
def test_launch_imports_only_config_and_parallel(source):
  imported = _imports(source, _modules('launch')[source])
  assert {m for m in imported if m.split('.')[1] not in ('config', 'parallel')} == set()


def _objective_comparisons(source: str, names: set[str]) -> list[int]:
  """Lines comparing something named like an objective with an objective's name."""
  lines = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Compare):
      continue
    sides = [node.left, *node.comparators]
    literals = set()
    for side in sides:
      items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
      literals |= {i.value for i in items if isinstance(i, ast.Constant)}
    if literals & names and any('objective' in ast.unparse(s) or ast.unparse(s) == 'name'
                                for s in sides):
      lines.append(node.lineno)
  return lines


def test_objective_names_are_compared_nowhere_but_in_their_table():
  from lm import objectives
  from lm.config import objective_traits
  names = set(objective_traits.TRAITS)
  assert set(objectives.BUILDERS) == names   # every objective in the table has a builder
  found = {name: lines for name, path in {**LM, **_modules('launch')}.items()
           if (lines := _objective_comparisons(path.read_text(), names))}
  assert found == {}
  assert _objective_comparisons("if config.train.objective in ('dpo', 'ppo'): pass", names)
  assert _objective_comparisons("name == 'mlm'", names)
  assert not _objective_comparisons("if fmt == 'sft': pass", names)


# Hugging Face model directories have their own config.json and tokenizer.json
HF_DIRECTORIES = ('lm.interop.hf', 'lm.data.tokenizers')


def test_the_run_directory_layout_is_spelled_only_in_rundir():
  from lm.config.rundir import RunDir
  run = RunDir('/r')
  names = {getattr(run, k).name for k, v in vars(RunDir).items() if isinstance(v, property)}
  assert {'config.json', 'tokenizer.json', 'checkpoints', 'final.json'} <= names
  spelled = sorted(
      f'{name}: {node.value!r}' for name, path in LM.items()
      if name != 'lm.config.rundir'
      for node in ast.walk(ast.parse(path.read_text()))
      if isinstance(node, ast.Constant) and node.value in names
      and not (name in HF_DIRECTORIES and node.value in ('config.json', 'tokenizer.json')))
  assert not spelled, spelled
