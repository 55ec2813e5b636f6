"""A run's checkpoint directory: where it is, that it can be written, and the disk its checkpoints need."""

from __future__ import annotations

import shutil
import uuid

import jax
from etils import epath

from lm import console
from lm.config import Config
from lm.errors import ConfigError
from lm.storage import absolute, is_remote


def checkpoint_directory(config: Config, workdir: str) -> str:
  """config.train.checkpoint_dir, or <workdir>/checkpoints when it is empty."""
  path = config.train.checkpoint_dir
  return absolute(path) if path else str(epath.Path(absolute(workdir)) / "checkpoints")


def check_writable(path: str, key: str) -> None:
  """Fails at startup, not at the first checkpoint, when a directory cannot be written."""
  try:
    directory = epath.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write_probe_{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # the backends (local, GCS) raise different types
    raise ConfigError(f"{key} = {path!r} cannot be written ({type(e).__name__}: {e}). "
                      "Pass a directory you can write to.") from e


def checkpoint_disk(abstract_state, checkpoint_dir: str, max_to_keep: int) -> str:
  """Disk the kept checkpoints need (one more while a save is written), and a warning if short."""
  size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
  needed = size * (max_to_keep + 1)
  text = f"{max_to_keep} kept + 1 being written x {size / 2**20:,.1f} MiB = {needed / 2**20:,.1f} MiB"
  if is_remote(checkpoint_dir):
    return text
  free = shutil.disk_usage(checkpoint_dir).free
  if free < needed:
    console.logger.warning("Only %.1f MiB free under %s, the checkpoints need %.1f MiB: lower "
                           "config.train.max_to_keep or free disk space.", free / 2**20, checkpoint_dir,
                           needed / 2**20)
  return f"{text} ({free / 2**30:,.1f} GiB free)"
