"""User errors, and how the launch scripts report them: one line, exit status 2, no traceback.

The library raises `UserError` (or `PathError`, or config_lib.ConfigError) for input that
cannot work: a config key or value, an argument, a path. The message names the input and
what is allowed. Every launch script ends with `cli.run(main)`, which prints those errors, and
the command line's own (an unknown or missing flag, a value that does not parse, a config
file or a --config.KEY that does not exist), as `error: <message>` on stderr and exits with
status 2. Any other exception is a crash and keeps its traceback.

This module imports nothing else from the library, so every module may raise its errors.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

USAGE_ERROR = 2  # the exit status of a user error (as argparse and POSIX utilities use)


class UserError(ValueError):
  """Input from the user that cannot work; the message names it and what is allowed."""


class PathError(UserError, FileNotFoundError):
  """A path the user gave that does not exist or does not hold what is needed."""


class MissingPackageError(UserError, ImportError):
  """An optional package that what the user asked for needs; the message says what to
  install."""


def run(main: Callable[[list], None], argv: Optional[Sequence[str]] = None):
  """`absl.app.run(main)` for a launch script: user errors become one line and status 2.

  Positional arguments are refused (settings are flags), and logging is quiet (WARNING) unless
  --verbosity is given: Orbax logs every checkpoint save at INFO.
  """
  app.run(functools.partial(_run_main, main), argv=argv, flags_parser=_parse_flags)


def unknown_key(config: ml_collections.ConfigDict, dotted: str,
                prefix: str = 'config') -> Optional[str]:
  """Why `prefix.dotted` names no key of `config` (one line), or None when it does."""
  node, parts = config, dotted.split('.')
  for i, part in enumerate(parts):
    where = '.'.join([prefix, *parts[:i]])
    if not isinstance(node, ml_collections.ConfigDict):
      return f'{prefix}.{dotted}: unknown key; {where} is a value, not a group of keys'
    if part not in node:
      return (f'{prefix}.{dotted}: unknown key; allowed keys of {where}: '
              f'{sorted(node.keys())}')
    node = node[part]
  return None


def check_seed(seed, name: str = 'seed') -> None:
  """Raises UserError naming the argument (or config key) unless seed is an int in
  0..2**63-1 (a bool or a float would otherwise fail inside jax.random.key, or be taken as
  0 or 1)."""
  if (not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_))
      or not 0 <= seed < 2**63):
    raise UserError(f'{name}={seed!r}: must be an int in 0..2**63-1')


def check_output_path(flag: str, path: str) -> None:
  """A PathError naming the flag unless `path` can be written (its folder exists): checked
  before the work, not after."""
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise PathError(f'{flag}={path}: the folder {folder} does not exist')


def _fail(message):
  lines = str(message).strip().splitlines() or [type(message).__name__]
  sys.stderr.write(''.join(f'error: {line}\n' for line in lines))
  sys.stderr.flush()
  sys.exit(USAGE_ERROR)


def _run_main(main, argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; settings are flags, e.g. --workdir=DIR')
  try:
    return main(argv)
  except UserError as e:
    _fail(e)


def _parse_flags(argv):
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_flag_error_message(e))
  except Exception as e:  # config_flags lets a missing config file or override key escape raw
    user_error = _user_error_in_chain(e)  # e.g. a config file that could not load
    if user_error is not None:
      _fail(user_error)
    problem = _config_flag_problem(argv, check_overrides=True)
    if problem is None:
      raise
    _fail(problem)
  problem = _config_flag_problem(argv, check_overrides=False)
  if problem is not None:  # config_flags defers a missing file's error to the first access
    _fail(problem)
  _load_config_flags()
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  return rest


def _load_config_flags():
  """Reads every config flag's value now: config_flags keeps an OSError raised while a
  config file loads (a PathError, e.g. a file the config looks up is missing) and raises it
  again, wrapped, on first access. A user error in that chain becomes one line here."""
  for name in list(flags.FLAGS):
    if flags.FLAGS[name].parser.flag_type() != 'config object':
      continue
    try:
      flags.FLAGS[name].value.keys()  # the first access to the loaded config
    except Exception as e:  # pylint: disable=broad-except
      user_error = _user_error_in_chain(e)
      if user_error is None:
        raise
      _fail(user_error)


def _user_error_in_chain(error: BaseException) -> Optional[UserError]:
  """The first UserError among error and its causes / contexts, or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, UserError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def _flag_error_message(error: flags.Error) -> str:
  """absl's message, or that of a user error in its chain: config_flags re-raises an error
  from inside a config file with that file's traceback pasted into the message."""
  user_error = _user_error_in_chain(error)
  return str(error if user_error is None else user_error)


def _config_flag_problem(argv, check_overrides: bool) -> Optional[str]:
  """A config file (--config=FILE[:ARG]) that does not exist, or, with check_overrides, an
  override (--config.KEY=VALUE) of a key the config does not have."""
  for name in list(flags.FLAGS):
    parser = flags.FLAGS[name].parser
    if parser.flag_type() != 'config object':  # not a config_flags.DEFINE_config_file flag
      continue
    value = _flag_argument(argv, name)
    if value is None:
      continue
    if not os.path.isfile(value.split(':', 1)[0]):
      return f'--{name}={value}: no such config file'
    if not check_overrides:
      continue
    config = parser.parse(value)
    if not isinstance(config, ml_collections.ConfigDict):
      continue
    override = re.compile(rf'^--?(?:no)?{re.escape(name)}\.([^=]+)')
    for match in filter(None, map(override.match, argv)):
      problem = unknown_key(config, match.group(1), prefix=name)
      if problem is not None:
        return problem
  return None


def _flag_argument(argv, name: str) -> Optional[str]:
  """The value of --name=VALUE or --name VALUE in argv (the last one given), or None."""
  value = None
  for i, arg in enumerate(argv):
    if re.match(rf'^--?{re.escape(name)}=', arg):
      value = arg.split('=', 1)[1]
    elif arg in (f'--{name}', f'-{name}') and i + 1 < len(argv):
      value = argv[i + 1]
  return value
