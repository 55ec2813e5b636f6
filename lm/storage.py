"""Where a file lives: a local path, or a URL of a remote file system (gs://, s3://, ...) that etils.epath
reads. Every module that reads or writes files asks here."""

from __future__ import annotations

import os


def is_remote(path) -> bool:
  """gs://, s3://, ...: no memory maps, no renames, no local disk checks."""
  return "://" in os.fspath(path)


def absolute(path: str) -> str:
  """A local path made absolute, `~` expanded (orbax requires absolute paths); a URL as it is."""
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))
