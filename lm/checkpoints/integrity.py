"""Checksums of a saved directory: `checksums.json` beside its files, written once they are complete,
checked before they are used. Orbax and tensorstore keep no checksum of array data (a flipped bit restores
as another number), so a checkpoint step carries the CRC-32 and size of every file in it.

No jax here: scripts that only check files import it cheaply.
"""

from __future__ import annotations

import json
import zlib

from etils import epath

MANIFEST = "checksums.json"
BLOCK = 16 * 1024 * 1024


class Corrupt(Exception):
  """A file differs from what was written (size or CRC-32), or is missing."""


def _files(directory: epath.Path) -> list[epath.Path]:
  """Every file under `directory` but the manifest, by listing each folder (gs:// has no recursive glob)."""
  found = []
  for path in directory.iterdir():
    if path.is_dir():
      found += _files(path)
    elif path.name not in (MANIFEST, MANIFEST + ".tmp"):
      found.append(path)
  return sorted(found)


def _crc(path: epath.Path) -> int:
  crc = 0
  with path.open("rb") as f:
    while block := f.read(BLOCK):
      crc = zlib.crc32(block, crc)
  return crc


def write(directory: str) -> None:
  """Records every file of `directory` (recursively) in its checksums.json, written whole or not at all."""
  root = epath.Path(directory)
  entries = {str(p.relative_to(root)): {"bytes": p.stat().length, "crc32": _crc(p)} for p in _files(root)}
  tmp = root / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
  tmp.rename(root / MANIFEST)


def verify(directory: str) -> bool:
  """True when every file recorded in `directory`'s checksums.json is there with its size and CRC-32;
  False when there is no checksums.json (written before checksums existed, or a save whose checksums were
  never written); Corrupt naming the first file that differs."""
  root = epath.Path(directory)
  manifest = root / MANIFEST
  if not manifest.exists():
    return False
  try:
    entries = json.loads(manifest.read_text())
  except ValueError as e:
    raise Corrupt(f"{manifest} is damaged ({e})") from None
  for name, expected in sorted(entries.items()):
    path = root / name
    if not path.exists():
      raise Corrupt(f"{path} is missing")
    size = path.stat().length
    if size != expected["bytes"]:
      raise Corrupt(f"{path} has {size:,} bytes, {expected['bytes']:,} when it was saved")
    if _crc(path) != expected["crc32"]:
      raise Corrupt(f"{path}: its CRC-32 differs from the one recorded when it was saved")
  return True
