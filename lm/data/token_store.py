"""Prepared token stores: their layout on disk, their manifest, and random access to their tokens.

One directory per source: manifest.json, and per shard and part (train, validation) two raw little-endian
arrays, Megatron's .bin/.idx layout: `<part>-<shard>.tokens` (the documents' ids one after the other, in
the smallest unsigned type that holds the vocabulary) and `<part>-<shard>.ends` (int64: where each
document ends in the shard); a chat source's (supervised fine-tuning: the manifest's "mask" is true) also
`<part>-<shard>.mask` (uint8, one per token: 1 where the token is learned, an assistant's). Why raw arrays
and not ArrayRecord: a training row is an arbitrary slice of the token stream, across documents, so the
reader wants byte ranges, not records; a raw array is memory-mapped (or read by range from gs://) without
parsing, and the preparation appends to it as it tokenizes, holding nothing. Segment ids and positions are
derived from the ends when a row is read (`lm.data.batching`). Written by `lm.data.prepare`; no jax here, so
that its worker processes stay small.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import zlib

from etils import epath
import numpy as np

from lm.errors import ConfigError
from lm.storage import is_remote

MANIFEST = "manifest.json"
FORMAT = 1
PARTS = ("train", "validation")
_OPEN_SHARDS = 256  # shards kept open per store (each memory map holds a file descriptor)


def shard_file(part: str, shard: int, what: str) -> str:
  """`what`: tokens, ends or mask."""
  return f"{part}-{shard:05d}.{what}"


def shard_of(path: str) -> int:
  """The shard index of a `shard_file` path."""
  return int(os.path.basename(path).split(".")[0].rsplit("-", 1)[1])


class _RangeReader:
  """A raw array on a remote file system (gs://...), read by byte ranges."""

  def __init__(self, path: epath.Path, dtype: np.dtype, count: int):
    self._file, self._dtype, self._count = path.open("rb"), dtype, count

  def __len__(self) -> int:
    return self._count

  def __getitem__(self, items: slice) -> np.ndarray:
    start, stop, _ = items.indices(self._count)
    self._file.seek(start * self._dtype.itemsize)
    data = self._file.read(max(stop - start, 0) * self._dtype.itemsize)
    return np.frombuffer(data, self._dtype)


def _check_size(path: epath.Path, expected: int, what: str) -> None:
  try:
    size = path.stat().length
  except OSError:
    size = None
  if size != expected:
    found = "missing" if size is None else f"{size:,} bytes, not {expected:,}"
    raise ConfigError(f"{what}: {path} is {found}: the prepared data is damaged. Run scripts/prepare_data.py "
                      "with the same config and --repair: it keeps the shards before the damaged one and "
                      "prepares the rest again.")


def open_array(path: epath.Path, dtype: np.dtype, count: int, what: str, searched: bool = False):
  """A memory map of a local raw array, after checking its size. A remote one is read by ranges, or whole
  when it is `searched` (np.searchsorted needs an array; document ends are 8 bytes a document)."""
  _check_size(path, count * dtype.itemsize, what)
  if count == 0:
    return np.zeros([0], dtype)
  if is_remote(path):
    return np.frombuffer(path.read_bytes(), dtype) if searched else _RangeReader(path, dtype, count)
  return np.memmap(path, dtype, mode="r", shape=(count,))


class TokenStore:
  """One part of a prepared source: its documents' tokens as one stream, with random access."""

  def __init__(self, directory: str, part: str, manifest: dict):
    self.directory, self.part = epath.Path(directory), part
    self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    self.masked = bool(manifest.get("mask", False))  # a chat source's: each token learned or not
    shards = [(s["index"], s[part]) for s in manifest["shards"] if s[part]["tokens"] > 0]
    self._shards = [index for index, _ in shards]
    self._sizes = [(entry["tokens"], entry["documents"]) for _, entry in shards]
    self._crcs = [entry.get("crc32", {}) for _, entry in shards]
    self._verified: set[int] = set()  # shards whose files matched their CRC-32s in this process
    self._starts = np.concatenate([[0], np.cumsum([n for n, _ in self._sizes], dtype=np.int64)])
    self.num_tokens = int(self._starts[-1])
    self.num_documents = sum(d for _, d in self._sizes)
    self._arrays: collections.OrderedDict[int, tuple] = collections.OrderedDict()

  def _files(self, k: int) -> list[tuple[epath.Path, np.dtype, int]]:
    tokens, documents = self._sizes[k]
    files = [(self.directory / shard_file(self.part, self._shards[k], "tokens"), self.dtype, tokens),
             (self.directory / shard_file(self.part, self._shards[k], "ends"), np.dtype("<i8"), documents)]
    if self.masked:
      files.append((self.directory / shard_file(self.part, self._shards[k], "mask"), np.dtype(np.uint8), tokens))
    return files

  def check_files(self) -> None:
    """Every local shard file is there with its size (a stat each, no data read). Remote ones are checked
    when first read: a request per file at start-up would grow with the corpus."""
    if not is_remote(self.directory):
      for k in range(len(self._shards)):
        for path, dtype, count in self._files(k):
          _check_size(path, count * dtype.itemsize, self._what)

  @property
  def _what(self) -> str:
    return f"prepared {self.part} data of {self.directory.name}"

  def _shard(self, k: int):
    """The shard's (tokens, ends, mask or None), opened on first use; the least recently used closed past
    a bound. The first time in a process, each file read whole here is checked against its CRC-32 of the
    manifest: a local shard's tokens and mask (memory maps; 0.12 s per 128M uint16 tokens here) and every
    shard's document ends. A remote shard's tokens and mask are read by ranges, not whole:
    `scripts/prepare_data.py --verify` checks those."""
    if k not in self._arrays:
      names = ("tokens", "ends", "mask")[:len(self._files(k))]
      arrays = [self._open(k, what, verify=k not in self._verified) for what in names]
      self._verified.add(k)
      self._arrays[k] = (*arrays, None) if len(arrays) == 2 else tuple(arrays)
      if len(self._arrays) > _OPEN_SHARDS:
        self._arrays.popitem(last=False)
    self._arrays.move_to_end(k)
    return self._arrays[k]

  def _open(self, k: int, what: str, verify: bool):
    """One file of shard k (tokens, ends or mask), checked against its CRC-32 when `verify` and it is read
    whole (a local file, or a remote shard's ends)."""
    path, dtype, count = self._files(k)[("tokens", "ends", "mask").index(what)]
    array = open_array(path, dtype, count, self._what, searched=what == "ends")
    expected = self._crcs[k].get(what)
    if verify and (what == "ends" or not is_remote(path)) and expected is not None and (
        zlib.crc32(np.ascontiguousarray(array).view(np.uint8)) != expected):
      raise ConfigError(f"{self._what}: {path} does not match the CRC-32 its preparation recorded: the "
                        "prepared data is corrupt. Run scripts/prepare_data.py with the same config and "
                        "--repair: it keeps the shards before the damaged one and prepares the rest again.")
    return array

  def _ranges(self, start: int, stop: int):
    """(shard arrays, shard start, lo, hi) of each shard that tokens [start, stop) of the stream cross."""
    k = int(np.searchsorted(self._starts, start, side="right")) - 1
    while k < len(self._shards) and self._starts[k] < stop:
      arrays, shard_start = self._shard(k), int(self._starts[k])
      yield arrays, shard_start, max(start - shard_start, 0), min(stop - shard_start, len(arrays[0]))
      k += 1

  def read(self, start: int, stop: int) -> tuple[np.ndarray, list[int]]:
    """Tokens [start, stop) of the stream, and the offsets (from start) where a document starts inside."""
    pieces, boundaries = [], []
    for (tokens, ends, _), shard_start, lo, hi in self._ranges(start, stop):
      if shard_start > start:  # shards hold whole documents: the shard's first token starts one
        boundaries.append(shard_start - start)
      inside = ends[int(np.searchsorted(ends, lo, side="right")):int(np.searchsorted(ends, hi, side="left"))]
      boundaries.extend(int(e) + shard_start - start for e in inside)
      pieces.append(np.asarray(tokens[lo:hi]))
    return np.concatenate(pieces), boundaries

  def read_mask(self, start: int, stop: int) -> np.ndarray:
    """Which tokens [start, stop) of the stream are learned (bool); a store without a mask: all."""
    if not self.masked:
      return np.ones(stop - start, bool)
    return np.concatenate([np.asarray(mask[lo:hi]) != 0 for (_, _, mask), _, lo, hi in self._ranges(start, stop)])

  def document_ends(self) -> np.ndarray:
    """Where each document ends in the stream (int64 [num_documents]): every shard's ends file read (and
    checked), not its tokens."""
    ends = [self._open(k, "ends", verify=True) + self._starts[k] for k in range(len(self._shards))]
    return np.concatenate(ends).astype(np.int64) if ends else np.zeros([0], np.int64)


def read_manifest(directory: str) -> dict | None:
  path = epath.Path(directory) / MANIFEST
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or not {"format", "dtype", "shards", "complete"} <= set(manifest):
      raise ValueError("not a manifest of prepared data")
    return manifest
  except ValueError as e:
    raise ConfigError(f"{path} is damaged ({e}): delete {directory} to prepare the source again.") from e


def write_manifest(directory: epath.Path, manifest: dict) -> None:
  write_atomic(epath.Path(directory) / MANIFEST, json.dumps(manifest, indent=1).encode())


def write_atomic(path: epath.Path, content: bytes) -> None:
  """The file appears whole or not at all: a local one is synced and renamed into place (a power loss
  cannot leave it listing data that never reached the disk); an object store writes whole objects."""
  if is_remote(path):
    path.write_bytes(content)
    return
  with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())
  os.chmod(f.name, 0o644)  # a temporary file is private; the data is not
  os.replace(f.name, path)


def verify(directory: str) -> list[str]:
  """Every shard file's CRC-32 against the manifest; the files that differ (or are missing)."""
  manifest = read_manifest(directory) or {"shards": []}
  bad = []
  for entry in manifest["shards"]:
    for part in PARTS:
      for what, expected in entry[part]["crc32"].items():
        file = epath.Path(directory) / shard_file(part, entry["index"], what)
        crc = 0
        try:
          with file.open("rb") as f:
            while block := f.read(16 << 20):
              crc = zlib.crc32(block, crc)
        except OSError:
          crc = None
        if crc != expected:
          bad.append(os.fspath(file))
  return bad
