"""Every config key with its default and the comment beside it in `base.get_base_config()`,
read from that function's source: the docs' config reference (`markdown()`) and
`python -m lm.main --show_config` (`annotated()`) cannot drift from the defaults."""
import ast
import inspect
import io
import re
import tokenize

import ml_collections

from lm.config import base


def comments() -> dict[str, str]:
  """'section.key' -> its comment: the lines just above the key and the one beside it."""
  source = inspect.getsource(base)
  notes = {}
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      notes[token.start[0]] = token.string.lstrip('#').strip()
  found = {}
  function = next(node for node in ast.parse(source).body
                  if isinstance(node, ast.FunctionDef) and node.name == 'get_base_config')
  for node in ast.walk(function):
    if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
            and isinstance(node.value, ast.Call) and node.value.args
            and isinstance(node.value.args[0], ast.Call)):
      continue
    section, previous_end = node.targets[0].attr, node.value.args[0].lineno
    for keyword in node.value.args[0].keywords:
      above, line = [], keyword.value.lineno - 1
      while line > previous_end and line in notes:   # comment lines directly above
        above.insert(0, notes[line])
        line -= 1
      beside = notes.get(keyword.value.end_lineno, '')
      text = ' '.join(p for p in (*above, beside) if p)
      found[f'{section}.{keyword.arg}'] = re.sub(   # 'one of REMAT_POLICIES': say them
          r'\bone of ([A-Z_]+)\b', lambda m: 'one of ' + ', '.join(
              repr(c) for c in getattr(base, m[1])) if hasattr(base, m[1]) else m[0], text)
      previous_end = keyword.value.end_lineno
  return found


def _flat(config: ml_collections.ConfigDict, prefix: str = '') -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _shown(value) -> str:
  """As a --config.KEY=VALUE override writes it."""
  return repr(value)


def markdown() -> str:
  """The reference: one table per section of key, default and meaning."""
  notes, lines, section = comments(), [], None
  defaults = _flat(base.get_base_config())
  for key in sorted(defaults, key=list(notes).index):   # in the order get_base_config says them
    head = key.split('.')[0]
    if head != section:
      section = head
      lines += ['', f'## `config.{section}`', '', '| key | default | meaning |',
                '| --- | --- | --- |']
    cell = lambda text: text.replace('|', '\\|')
    lines.append(f'| `{key}` | `{cell(_shown(defaults[key]))}` | {cell(notes[key])} |')
  return '\n'.join(lines).strip() + '\n'


def annotated(config: ml_collections.ConfigDict) -> str:
  """`config`'s every value, one per line, with the base config's comment beside it."""
  notes = comments()
  flat = _flat(config)
  rows = [(key, _shown(flat[key]), notes.get(key, ''))
          for key in sorted(flat, key=lambda k: list(notes).index(k) if k in notes else 1e9)]
  width = min(48, max(len(f'{k} = {v}') for k, v, _ in rows))
  return '\n'.join((f'{k} = {v}'.ljust(width) + (f'   # {n}' if n else '')).rstrip()
                   for k, v, n in rows)
