"""What the six commands share on the command line, so that each `main` stays thin.

`run(main)` replaces `app.run(main)`: before absl parses the flags, every `--config.a.b=v` override
is checked against the config's keys (a typo gets the same "did you mean" as in an experiment
file, not ml_collections' traceback) and `--config.a.b=None` is taken out for optional keys (absl
would parse it as an int or a float) and applied after parsing. The whole config is validated
before `main` runs, and bad input (a flag, a ConfigError) is one `error: ...` line, exit status 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags

from jaxsae import config as config_lib
from jaxsae.errors import ConfigError

USAGE_ERROR = 2  # the exit status of bad input, as argparse's
_OVERRIDE = re.compile(r'--?(no)?config\.([^=]*)(?:=(.*))?', re.DOTALL)
_CONFIG = re.compile(r'--?config(?:=(.*))?', re.DOTALL)
_NONE = ('None', 'none')


@dataclasses.dataclass
class Overrides:
  """argv with `--config.key=None` taken out, and those keys (applied after parsing)."""

  argv: list[str]
  none_keys: list[str]


def fail(message: object) -> NoReturn:
  """Print one `error: ...` line and exit with USAGE_ERROR."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(USAGE_ERROR)


def _check_key(key: str, negated: bool, arg: str) -> None:
  keys = config_lib.config_keys()
  sections = {k.rsplit('.', i)[0] for k in keys for i in range(1, k.count('.') + 1)}
  if key not in keys and key not in sections:
    raise ConfigError(config_lib.unknown_key(key, f' (from {arg})'))
  if negated and not isinstance(keys.get(key), bool):
    raise ConfigError(f'{arg}: --no applies to True/False keys only; {key} is not one.')


def _none_allowed(key: str) -> bool:
  """Whether `--config.key=None` means None (an optional key), or is left to the flag parser (a
  string key keeps the text 'None'); ConfigError for other keys."""
  rule = config_lib.RULES.get(key)
  if rule is None or rule.kind in ('str', 'choice'):  # a section, or a string key
    return False
  if rule.optional:
    return True
  raise ConfigError(
      f'{key} cannot be None: it must be {rule.allowed()}. Only optional keys take None: '
      + ', '.join(k for k, r in config_lib.RULES.items() if r.optional)
      + '.'
  )


def prepare_overrides(argv: Sequence[str]) -> Overrides:
  """Check the `--config.` overrides of `argv` against the config's keys and take out the
  `=None` ones (ConfigError naming the flag otherwise). The last override of a key wins."""
  out, none_keys = [], {}
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == '--':
      out += argv[i:]
      break
    m = _OVERRIDE.fullmatch(arg)
    if m is None or i == 0:
      out.append(arg)
      i += 1
      continue
    negated, key, value = bool(m.group(1)), m.group(2), m.group(3)
    _check_key(key, negated, arg)
    separate = value is None and not negated and i + 1 < len(argv) and argv[i + 1] in _NONE
    if (value in _NONE or separate) and not negated and _none_allowed(key):
      none_keys[key] = True
      i += 2 if separate else 1
      continue
    none_keys.pop(key, None)
    out.append(arg)
    i += 1
  return Overrides(out, list(none_keys))


def _check_config_file(argv: Sequence[str]) -> None:
  """A missing experiment file named by --config is an error line, not ml_collections' IOError
  when the config is first touched."""
  for i, arg in enumerate(argv[1:], 1):
    m = _CONFIG.fullmatch(arg)
    if m is None:
      continue
    path = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else '')
    path = path.split(':', 1)[0]
    if not os.path.isfile(path):
      raise ConfigError(
          f'--config: no experiment file at {path!r}; pass the path of a file such as '
          'experiments/demo.py.'
      )


def set_none(c: Any, keys: Sequence[str]) -> None:
  """Set each dotted key of `c` to None."""
  for key in keys:
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = None


def _flag_message(error: flags.Error) -> str:
  message = str(error)
  if 'Error whilst parsing config file' in message:  # ml_collections adds the whole traceback
    last = [line for line in message.splitlines() if line.strip()][-1]
    return f'the experiment file failed: {last.strip()}'
  return ' '.join(message.split()) + ' (--helpfull lists the flags)'


def _has_config() -> bool:
  """Whether the command defines --config (every command's is an ml_collections config file)."""
  return 'config' in flags.FLAGS


def _finish_config(none_keys: Sequence[str]) -> None:
  """The `=None` overrides applied, then the whole config validated (before any compute)."""
  c = flags.FLAGS.config
  try:
    set_none(c, none_keys)
    config_lib.validate(c)
  except OSError as e:  # ml_collections defers an experiment file's IOError to the first access
    raise ConfigError(f'{flags.FLAGS["config"].serialize()}: {e}') from None


def run(main: Callable[[list[str]], Any], errors: tuple[type[BaseException], ...] = ()) -> None:
  """app.run(main) with the config overrides checked and the config validated first; `errors`:
  exception types besides ConfigError that are reported as an error line."""
  none_keys: list[str] = []

  def parse(argv: list[str]) -> list[str]:
    try:
      argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
      if _has_config():
        _check_config_file(argv)
        prepared = prepare_overrides(argv)
        argv, none_keys[:] = prepared.argv, prepared.none_keys
      sys.argv[:] = argv  # ml_collections reads its overrides from sys.argv itself
      return flags.FLAGS(argv)
    except ConfigError as e:
      fail(e)
    except flags.Error as e:
      fail(_flag_message(e))

  def wrapped(argv: list[str]) -> Any:
    try:
      if _has_config():
        _finish_config(none_keys)
      return main(argv)
    except (ConfigError, *errors) as e:
      fail(e)

  app.run(wrapped, flags_parser=parse)


class FloatListParser(flags.ListParser):
  """A comma-separated list of finite numbers: 'nan' or 'inf' is refused with the flag's name."""

  def parse(self, argument: str | Sequence[Any]) -> list[float]:
    values = super().parse(argument) if isinstance(argument, str) else list(argument)
    out = []
    for v in values:
      try:
        x = float(v)
      except (TypeError, ValueError):
        raise ValueError(f'{v!r} is not a number') from None
      if not math.isfinite(x):
        raise ValueError(f'{v!r} is not a finite number')
      out.append(x)
    return out

  def flag_type(self) -> str:
    return 'comma separated list of finite numbers'


class IntListParser(flags.ListParser):
  """A comma-separated list of integers."""

  def parse(self, argument: str | Sequence[Any]) -> list[int]:
    values = super().parse(argument) if isinstance(argument, str) else list(argument)
    try:
      return [int(v) for v in values]
    except (TypeError, ValueError):
      raise ValueError(f'{argument!r} is not a comma-separated list of integers') from None

  def flag_type(self) -> str:
    return 'comma separated list of integers'


def _caller_module() -> str:
  """The module that defines a flag, as absl names it (so that --helpshort lists the flag)."""
  name = sys._getframe(2).f_globals.get('__name__', '')  # pylint: disable=protected-access
  return sys.argv[0] if name == '__main__' else name


def define_float_list(
    name: str, default: Sequence[float] | None, help_text: str, **kw
) -> flags.FlagHolder:
  """A flag taking finite numbers, e.g. --alpha=0,2.5,8."""
  kw.setdefault('module_name', _caller_module())
  return flags.DEFINE(
      FloatListParser(), name, default, help_text, serializer=flags.CsvListSerializer(','), **kw
  )


def define_int_list(
    name: str, default: Sequence[int] | None, help_text: str, **kw
) -> flags.FlagHolder:
  """A flag taking integers, e.g. --feature=12,40."""
  kw.setdefault('module_name', _caller_module())
  return flags.DEFINE(
      IntListParser(), name, default, help_text, serializer=flags.CsvListSerializer(','), **kw
  )
