"""Sweep points for experiment files' `get_sweep()`: grids, random draws, names, checks.

A sweep point is a dict of dotted config keys to values, e.g. {'model.d_model': 256}.
"""
import ast
import difflib
import itertools
import math
import re

import ml_collections
import numpy as np

from lm.config import ConfigError


def grid(**axes) -> list[dict]:
  """Every combination: grid(**{'model.d_model': [64, 128], 'optim.lr': [1e-3, 3e-3]})."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def log_uniform(low: float, high: float, count: int, seed: int = 0) -> list[float]:
  """`count` values drawn log-uniformly from [low, high], reproducibly."""
  rng = np.random.default_rng(seed)
  return [float(math.exp(v)) for v in rng.uniform(math.log(low), math.log(high), count)]


def uniform(low: float, high: float, count: int, seed: int = 0) -> list[float]:
  return [float(v) for v in np.random.default_rng(seed).uniform(low, high, count)]


def zipped(**axes) -> list[dict]:
  """Points that vary several keys together: zipped(**{'a': [1, 2], 'b': [3, 4]})."""
  lengths = {len(v) for v in axes.values()}
  if len(lengths) != 1:
    raise ConfigError(f'zipped sweep axes have different lengths: '
                      f'{ {k: len(v) for k, v in axes.items()} }')
  return [dict(zip(axes, values)) for values in zip(*axes.values())]


def product(*point_lists: list[dict]) -> list[dict]:
  """Every combination of points from each list, merged: product(sizes, budgets)."""
  return [{k: v for point in combo for k, v in point.items()}
          for combo in itertools.product(*point_lists)]


def run_name(point: dict) -> str:
  """A stable, readable directory name: {'model.d_model': 64, 'optim.lr': 0.001} ->
  'd_model=64,lr=0.001' (the last part of each key; values as written)."""
  parts = []
  for key, value in point.items():
    text = f'{value:g}' if isinstance(value, float) else str(value)
    parts.append(f'{key.split(".")[-1]}={re.sub(r"[^A-Za-z0-9._+-]", "_", text)}')
  return ','.join(parts) or 'base'


def apply(config: ml_collections.ConfigDict, point: dict) -> ml_collections.ConfigDict:
  """A copy of config with the point's overrides; unknown keys name the closest real one."""
  config = ml_collections.ConfigDict(config.to_dict())
  known = flat_keys(config)
  for key, value in point.items():
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      hint = f"; did you mean '{close[0]}'?" if close else ''
      raise ConfigError(f"sweep override '{key}' is not a config key{hint}")
    section, _, name = key.rpartition('.')
    target = config
    for part in section.split('.') if section else []:
      target = target[part]
    target[name] = type(target[name])(value) if isinstance(target[name], float) else value
  return config


def as_flags(point: dict) -> list[str]:
  """The point as `--config.KEY=VALUE` command-line overrides."""
  return [f'--config.{key}={value!r}' if isinstance(value, (tuple, list)) else
          f'--config.{key}={value}' for key, value in point.items()]


def flat_keys(config, prefix: str = '') -> list[str]:
  """Every key of the config, dotted (model.d_model, ...)."""
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += flat_keys(value, f'{prefix}{key}.')
    else:
      keys.append(f'{prefix}{key}')
  return keys


def sweep_points(specs: list[str], flag: str = '--sweep') -> list[dict]:
  """`--sweep KEY=V1,V2,...` flags (lm.plan's; `flag` names them in errors) as points (their
  product): values as Python literals where they parse ((1,4,1,1),(4,1,1,1); 8,16), else
  strings (none,full)."""
  axes = []
  for spec in specs:
    key, sep, values = spec.partition('=')
    if not sep or not values:
      raise ConfigError(f'{flag}={spec!r} must be KEY=V1,V2,...')
    try:
      parsed = list(ast.literal_eval(f'[{values}]'))
    except (ValueError, SyntaxError):
      parsed = [v.strip() for v in values.split(',')]
    axes.append([{key: v} for v in parsed])
  return product(*axes) if axes else [{}]
