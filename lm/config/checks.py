"""The error every bad config value or input file raises, and the check most fields use."""
import difflib


class ConfigError(ValueError):
  """Bad user input, reported as one line naming the field or file."""


def one_of(field: str, value, allowed) -> None:
  if value not in allowed:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    raise ConfigError(f'config.{field}={value!r} is not one of {list(allowed)}{hint}')
