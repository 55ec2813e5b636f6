"""The `--config=FILE[:ARG]` flag and its `--config.KEY=value` overrides, checked before absl parses them.

ml_collections' config flag ends in a traceback when the file is missing, does not compile, has no
get_config(), or an override names a key the config lacks. `parse_flags` (absl's `flags_parser`) checks
those first and stops with one "Configuration error: ..." line naming the file or the key, exit status 2.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
import types

import ml_collections

from lm.errors import ConfigError

_EXAMPLE = "--config=configs/default.py"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), after `check_command_line`."""
  from absl import app, flags  # here: only the commands need absl

  try:
    expanded = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
  except flags.Error:  # a bad --flagfile: absl's own parsing reports it
    expanded = None
  if expanded is not None:
    try:
      check_command_line(expanded)
    except ConfigError as e:
      print(f"Configuration error: {e}", file=sys.stderr)
      sys.exit(2)
  return app.parse_flags_with_usage(argv)


def check_command_line(args: list[str]) -> None:
  """ConfigError when `--config` names a file that does not load, or an override a key it lacks."""
  value = _config_value(args)
  if value is None:  # absl says that the flag is required
    return
  config = load(value)
  for arg in args:
    match = re.match(r"-{1,2}(?:no)?config\.([^=]+)", arg)
    if match:
      _check_key(config, match[1], value.partition(":")[0])


def _config_value(args: list[str]) -> str | None:
  """The last value given to --config (as --config=VALUE or --config VALUE), before a `--` that ends the
  flags."""
  value = None
  for i, arg in enumerate(args):
    if arg == "--":
      break
    match = re.fullmatch(r"-{1,2}config(=(.*))?", arg, re.DOTALL)
    if match:
      value = match[2] if match[1] is not None else (args[i + 1] if i + 1 < len(args) else None)
  return value


def load(value: str) -> ml_collections.ConfigDict:
  """What `--config=value` gives: get_config(ARG) of the file (`FILE:ARG`, ARG optional)."""
  path, colon, arg = value.partition(":")
  flag = f"--config={value}"
  if not path:
    raise ConfigError(f"--config is empty: name a config file, e.g. {_EXAMPLE}.")
  if not os.path.exists(path):
    relative = "" if os.path.isabs(path) else f" (relative to the current directory, {os.getcwd()})"
    raise ConfigError(f"{flag}: {os.path.abspath(path)} does not exist{relative}. Name a config file, e.g. "
                      f"{_EXAMPLE}.")
  if os.path.isdir(path):
    raise ConfigError(f"{flag}: {path} is a directory. Name a config file in it, e.g. {_EXAMPLE}.")
  try:
    with open(path, "rb") as f:
      code = compile(f.read(), path, "exec")
  except SyntaxError as e:
    raise ConfigError(f"{flag}: {path} is not valid Python: line {e.lineno}: {e.msg} "
                      f"({(e.text or '').strip()!r}). Fix the file.") from None
  except (OSError, ValueError) as e:  # unreadable; NUL bytes in the source
    raise ConfigError(f"{flag}: {path} cannot be read as Python ({type(e).__name__}: {e}).") from None
  module = types.ModuleType("config_file")
  module.__file__ = path
  try:
    exec(code, module.__dict__)  # pylint: disable=exec-used
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
      raise ConfigError(f"{flag}: {path} defines no get_config(). A config file defines `def get_config():` "
                        "returning its ml_collections.ConfigDict, as configs/default.py does.")
    config = get_config(*([arg] if colon else []))
  except ConfigError:
    raise
  except Exception as e:  # the config file's own code failed
    raise ConfigError(f"{flag}: {path} failed{_line_in(path, e)}: {type(e).__name__}: {e}. Fix the "
                      "file.") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{flag}: get_config() of {path} returned {type(config).__name__}, not an "
                      "ml_collections.ConfigDict (a missing `return c`?).")
  return config


def _line_in(path: str, error: Exception) -> str:
  """' at line N' of the innermost frame of `path` in the error's traceback."""
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == path]
  return f" at line {lines[-1]}" if lines else ""


def _check_key(config: ml_collections.ConfigDict, key: str, path: str) -> None:
  """ConfigError naming `--config.KEY` (and the keys close to it) when the config has no such key."""
  node, parts = config, key.split(".")
  for depth, part in enumerate(parts):
    where = ".".join(["config", *parts[:depth]])
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"--config.{key}: {where} = {node!r} is a value, not a section with keys; override "
                        f"it as --{where}=VALUE.")
    if part not in node:
      close = difflib.get_close_matches(key, _keys(config), n=3, cutoff=0.7)
      hint = f" Did you mean {' or '.join('--config.' + k for k in close)}?" if close else ""
      keys = sorted(node.keys())
      listed = f"; its keys are {', '.join(keys)}" if len(keys) <= 10 else ""
      raise ConfigError(f"--config.{key}: {where} of {path} has no key {part!r}{listed}.{hint} Every key is "
                        "declared in configs/base.py.")
    node = node[part]


def _keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every key of the config, dotted ("train.seq_len"), sections included."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(_keys(value, f"{prefix}{key}."))
  return out
