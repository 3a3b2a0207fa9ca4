"""The command line, as every command reads it: one argparse style (`parser`), the experiment
flags (`add_config`, `parse`: --config FILE[:VARIANT] and --config.KEY=VALUE overrides, read by
ml_collections), and a mistake as one line on stderr and exit code 2 (`fail`), not a traceback
or a usage page. In `config` (floor 1) so that launch/ and the task modules' commands share it."""
import argparse
import difflib
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from lm.config.checks import ConfigError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """The description as written, and each flag's default after its help (where it has one)."""

  def _get_help_string(self, action: argparse.Action) -> str:
    if action.default in (None, False, '', []):
      return action.help
    return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
  """argparse, with a mistake as one line and exit code 2 (the usage is a --help away), the
  closest flag named for a mistyped one, and the style of `parser` (subcommands' too)."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('formatter_class', HelpFormatter)
    kwargs.setdefault('allow_abbrev', False)
    super().__init__(*args, **kwargs)

  def parse_known_args(self, args=None, namespace=None):
    self._given = list(sys.argv[1:] if args is None else args)
    return super().parse_known_args(args, namespace)

  def error(self, message: str) -> None:
    unknown = [a for a in getattr(self, '_given', ()) if a.startswith('--') and not
               _is_override(a) and a.split('=')[0] not in self._option_string_actions]
    if message.startswith('the following arguments are required') and unknown:
      message = f'unrecognized arguments: {" ".join(unknown)}'   # a required flag mistyped
    if message.startswith('unrecognized arguments: '):
      known = [s[2:] for action in self._actions for s in action.option_strings
               if s.startswith('--')]
      for arg in message.removeprefix('unrecognized arguments: ').split():
        close = difflib.get_close_matches(arg.split('=')[0][2:], known, n=1)
        if arg.startswith('--') and close:
          message += f'; did you mean --{close[0]}?'
          break
    elif choice := re.search(r"invalid choice: '(.*)' \(choose from (.*)\)$", message):
      close = difflib.get_close_matches(choice[1], re.findall(r"'([^']*)'", choice[2]), n=1)
      message += f'; did you mean {close[0]!r}?' if close else ''
    fail(f'{message} ({self.prog} --help lists the flags)')


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
  """The one style of the commands: flags spelled with underscores (hyphenated ones that
  commands took before stay as aliases), every flag with its help and default, no prefix of a
  flag taken for it (`--max_new_token` is an error, not `--max_new_tokens`), and a mistake as
  one line."""
  return Parser(prog=prog, description=description)


def add_config(parser: argparse.ArgumentParser, lock: bool = True) -> None:
  """The experiment flags: --config FILE[:VARIANT] and any number of --config.KEY=VALUE
  overrides, which `parse` reads with ml_collections (its types, tuples and None). `lock`: a
  config whose keys no code may add (a command that applies sweeps to it passes False)."""
  group = parser.add_argument_group(
      'experiment', 'any number of --config.KEY=VALUE (e.g. --config.train.steps=100) set keys of\n'
      'the config; python -m lm.main --config FILE --show_config lists them')
  group.add_argument('--config', required=True, metavar='FILE[:VARIANT]',
                     help='experiment file with get_config() (VARIANT is passed to it)')
  parser.set_defaults(lock_config=lock)


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
  """The command line of a command with `add_config`: args.config is the experiment's config
  with the overrides applied, args.experiment the FILE[:VARIANT] it came from."""
  args, rest = parser.parse_known_args(argv)
  if not hasattr(args, 'lock_config'):   # a subcommand without the experiment flags
    if rest:
      parser.error(f'unrecognized arguments: {" ".join(rest)}')
    return args
  unknown = [a for i, a in enumerate(rest) if not _is_override(a) and (
      re.match(r'-+[^\d.]', a) or i == 0 or '=' in rest[i - 1] or not _is_override(rest[i - 1]))]
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  args.experiment = args.config
  args.config = load_config(args.experiment, rest, args.lock_config)
  return args


def _is_override(arg: str) -> bool:
  return re.match(r'--(no)?config\.', arg) is not None


def load_config(value: str, overrides: list[str], lock: bool = True):
  """The config of `--config value` with `overrides` (--config.KEY=VALUE arguments) applied by
  ml_collections; a missing experiment file, an unknown variant or a mistyped override is one
  line (exit 2) instead of a traceback."""
  path = value if os.path.exists(value) else value.rpartition(':')[0] or value
  if not os.path.exists(path):
    fail(f'--config: no such experiment file: {path}')
  if os.path.exists(os.path.join(os.path.dirname(path), '__init__.py')):
    # an experiment in a package imports its siblings (`from experiments import x`), also
    # when the command is a script outside the repository root (python benchmarks/x.py)
    parent = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if parent not in sys.path:
      sys.path.insert(0, parent)
  argv = ['lm', f'--config={value}', *overrides]
  values = flags.FlagValues()   # ml_collections parses through absl flags: its own, not global
  holder = config_flags.DEFINE_config_file('config', flag_values=values, lock_config=lock,
                                           sys_argv=argv)
  try:
    left = values(argv)[1:]
    config = holder.value   # the overrides are applied here
  except (AttributeError, KeyError) as e:   # an override naming a key the config lacks
    fail(f'a --config.* override names no config key: {_one_line(e)}')
  except flags.Error as e:   # a bad value, a refused variant
    for cause in _causes(e):
      if isinstance(cause, ConfigError):   # get_config refused the variant (read_variant)
        fail(f'--config={value}: {cause}')
      if isinstance(cause, TypeError) and 'get_config() takes 0' in str(cause):
        fail(f'--config={value}: {path} has no variants (give the file alone)')
    fail(str(e).splitlines()[0].removesuffix(': Error whilst parsing config file:'))
  if left:
    fail(f'unrecognized arguments: {" ".join(left)}')
  return config


def _causes(error: BaseException) -> list[BaseException]:
  """The error and those it came from, the first cause last."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain[::-1]


def _one_line(error: Exception) -> str:
  """ml_collections' message, which arrives as the repr of a KeyError's text, as one line."""
  text = str(error.args[0] if error.args else error)
  return ' '.join(text.replace('\\n', ' ').replace('\\', '').replace("'", '').split())


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)
