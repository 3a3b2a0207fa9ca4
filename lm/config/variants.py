"""An experiment's variant, the text after ':' in `--config experiments/X.py:VARIANT`, read
strictly: `NAME[,FLAG...][,KEY=VALUE...]`. A name, flag or key the experiment does not know
is a ConfigError naming the ones it does, so a typo (`:smok`) never runs the default job."""
import dataclasses
import difflib
from collections.abc import Mapping, Sequence

from lm.config.checks import ConfigError


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  flags: frozenset[str]
  options: dict[str, str]   # every key of `keys`, given or defaulted


def read(text: str | None, names: Sequence[str] = ('',), flags: Sequence[str] = (),
         keys: Mapping[str, str] | None = None) -> Variant:
  """`text` (None or '' for no variant) against the experiment's `names` (its first part; ''
  allows none), `flags` (bare words after it) and `keys` (KEY=VALUE options, with their
  defaults)."""
  parts = [p for p in (text or '').split(',') if p]
  name = parts.pop(0) if parts and '=' not in parts[0] and parts[0] not in flags else ''
  if name not in names:
    real = [n for n in names if n]
    close = difflib.get_close_matches(name, real, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    named = ', '.join(map(repr, real)) + (' or none' if '' in names else '')
    raise ConfigError(f'unknown variant {name!r}{hint}; '
                      + (f'the variants are {named}' if real else 'this experiment has none')
                      + _extras(flags, keys))
  given, options = set(), dict(keys or {})
  for part in parts:
    key, is_option, value = part.partition('=')
    if is_option and key in options:
      options[key] = value
    elif not is_option and part in flags:
      given.add(part)
    else:
      raise ConfigError(f'unknown variant option {part!r}'
                        f'{_extras(flags, keys) or " (this experiment has none)"}')
  return Variant(name, frozenset(given), options)


def _extras(flags: Sequence[str], keys: Mapping[str, str] | None) -> str:
  said = [*flags, *(f'{k}=...' for k in keys or {})]
  return f' (options: {", ".join(said)})' if said else ''
