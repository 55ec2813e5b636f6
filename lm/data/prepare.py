"""Preparation of a source: its documents tokenized in parallel, streaming, into shards on disk.

The main process reads raw chunks of the source (`lm.data.sources.chunks`) and writes; worker processes decode
and tokenize the chunks, and their results are written in chunk order, so the shards are bitwise the same
whatever the number of workers. Nothing grows with the corpus: a bounded window of chunks is in flight,
and each shard's arrays are appended to files as the chunks arrive.

A shard holds the documents of consecutive chunks, cut once its train and validation tokens reach
config.data.shard_tokens (so shards hold whole documents and are that size plus at most one chunk). Each
shard appears complete or not at all (written beside, then renamed or copied into place), and
manifest.json lists the finished shards with their chunk ranges: a killed preparation resumes after its
last finished shard, and `repair` goes back to the first damaged one. The layout is `lm.data.token_store`'s.

A chat source's conversations are tokenized with the model's chat template (`lm.data.chat.Chat.tokenize`, the
Chat handed to the workers as the tokenizer is), each a document of its own with no separator added, and
their learned tokens written as each shard's third array, its mask.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import os
import shutil
import tempfile
import time
import zlib
from typing import Iterator

from absl import logging
from etils import epath
import numpy as np

from lm.config import SourceConfig
from lm.data import sources, tokenizer as tokenizers
from lm.data.token_store import FORMAT, PARTS, read_manifest, shard_file, shard_of, verify, write_manifest
from lm.storage import is_remote

_WINDOW_PER_WORKER = 4  # chunks in flight per worker: enough to keep each busy, and memory bounded


# ---------------------------------------------------------------------------------------------------
# Workers


_worker_tokenizer = _worker_chat = None


def _init_worker(tokenizer, chat) -> None:
  global _worker_tokenizer, _worker_chat
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # Hugging Face's threads: the processes are the parallelism
  _worker_tokenizer, _worker_chat = tokenizer, chat


def _tokenize(task: tuple[str, sources.Chunk, float, np.dtype], tok=None, chat=None) -> dict:
  """One chunk: {part: (tokens, document lengths, learned tokens or None)}, the train part's held-out
  documents moved to validation when `fraction` > 0; and the chunk's documents and bytes."""
  part, chunk, fraction, dtype = task
  tok, chat = tok or _worker_tokenizer, chat or _worker_chat
  decoded = sources.decode(chunk)
  kept = [n for n, t in enumerate(decoded.texts) if t]
  texts = [decoded.texts[n] for n in kept]
  to_validation = [part == "validation" or (fraction > 0 and sources.held_out(t, fraction)) for t in texts]
  out = {}
  for name, wanted in (("train", False), ("validation", True)):
    chosen = [n for n, v in zip(kept, to_validation) if v == wanted]
    if decoded.conversations is None:
      ids, learned = tokenizers.frame(tok, [decoded.texts[n] for n in chosen]), None
    else:
      ids, learned = zip(*[chat.tokenize(c.messages, tok, c.learn_from, c.where)
                           for c in (decoded.conversations[n] for n in chosen)]) if chosen else ((), ())
    lengths = np.fromiter((len(d) for d in ids), np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, count=int(lengths.sum()))
    out[name] = (flat, lengths, None if learned is None else np.concatenate([np.zeros(0, bool), *learned]))
  out["documents"], out["bytes"] = len(texts), sum(len(t.encode("utf-8", errors="replace")) for t in texts)
  out["invalid"] = decoded.invalid
  return out


def _ordered_map(tasks: Iterator, tokenizer, workers: int, chat=None) -> Iterator[dict]:
  """_tokenize over the tasks, results in task order, at most a window of tasks in flight. A source of
  fewer chunks than the window is done in this process (no worker start-up for a small corpus)."""
  window = _WINDOW_PER_WORKER * workers
  head = list(itertools.islice(tasks, window))
  if len(head) < window or workers == 1:
    yield from (_tokenize(task, tokenizer, chat) for task in itertools.chain(head, tasks))
    return
  # spawn, not fork: the caller may have started jax (threads), which a forked child would inherit broken.
  with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer, chat)) as pool:
    pending = collections.deque(pool.apply_async(_tokenize, (task,)) for task in head)
    for task in tasks:
      yield pending.popleft().get()
      pending.append(pool.apply_async(_tokenize, (task,)))
    while pending:
      yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------------
# Shards


class _PartFile:
  """The arrays of one part of the shard being written (tokens, ends; mask when `masked`), appended to
  local temporary files."""

  def __init__(self, local_dir: str, part: str, shard: int, masked: bool):
    self.names = {what: shard_file(part, shard, what) for what in ("tokens", "ends", "mask")[:2 + masked]}
    self._files = {what: open(os.path.join(local_dir, name + ".tmp"), "wb") for what, name in self.names.items()}
    self._crc = {what: 0 for what in self.names}
    self.tokens = self.documents = 0

  def append(self, flat: np.ndarray, lengths: np.ndarray, learned: np.ndarray | None) -> None:
    ends = (self.tokens + np.cumsum(lengths)).astype("<i8")
    arrays = {"tokens": flat, "ends": ends, "mask": None if learned is None else learned.astype(np.uint8)}
    for what in self.names:
      data = arrays[what].tobytes()
      self._files[what].write(data)
      self._crc[what] = zlib.crc32(data, self._crc[what])
    self.tokens += len(flat)
    self.documents += len(lengths)

  def finish(self, local_dir: str, directory: epath.Path) -> dict:
    """Closes the files and puts them in place under their final names; their manifest entry."""
    for what, f in self._files.items():
      f.flush()
      os.fsync(f.fileno())  # on disk before the manifest lists it
      f.close()
      local = os.path.join(local_dir, self.names[what] + ".tmp")
      if is_remote(directory):
        epath.Path(local).copy(directory / self.names[what], overwrite=True)
        os.remove(local)
      else:
        os.replace(local, directory / self.names[what])
    return {"tokens": self.tokens, "documents": self.documents, "crc32": dict(self._crc)}


@contextlib.contextmanager
def _local_scratch(directory: epath.Path):
  """Where shard files are written before they are put in place: beside them (a rename) when local."""
  path = tempfile.mkdtemp(dir=None if is_remote(directory) else directory, prefix=".writing-")
  try:
    yield path
  finally:
    shutil.rmtree(path, ignore_errors=True)


def _cpu_count() -> int:
  """The cores this process may use (a container's or a job's limit, not the machine's)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(src: SourceConfig, tokenizer, directory: str, *, identity: dict, workers: int,
            shard_tokens: int, chat=None) -> dict:
  """Prepares the source into `directory` (resuming a killed preparation there) and returns its manifest.
  `chat` (lm.data.chat.Chat): the model's, for a chat source."""
  path = epath.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  if (src.kind == "chat") != (chat is not None):
    raise ValueError(f"{sources.key(src)}: a chat source is prepared with a Chat, another kind without")
  manifest = read_manifest(directory) or {
      "format": FORMAT, "identity": identity, "tokenizer": tokenizer.fingerprint,
      "dtype": tokenizers.token_dtype(tokenizer.vocab_size).name, "shards": [], "complete": False,
      **({"mask": True, "chat": chat.fingerprint} if chat is not None else {})}
  if manifest.get("complete"):
    return manifest
  fraction = 0.0 if src.validation else src.validation_fraction
  dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
  tasks = ((part, chunk, fraction, dtype) for part in PARTS if part == "train" or src.validation
           for chunk in sources.chunks(src, part))
  done = manifest["shards"][-1]["chunks"][1] if manifest["shards"] else 0
  if done:
    logging.info("%s: resuming the preparation after %d finished shards (%d chunks)", sources.key(src),
                 len(manifest["shards"]), done)
  progress, shard, invalid = _Progress(manifest), None, collections.Counter()
  with _local_scratch(path) as scratch:
    for n, result in enumerate(_ordered_map(itertools.islice(tasks, done, None), tokenizer,
                                            workers or _cpu_count(), chat), done):
      invalid.update(result["invalid"])
      shard = shard or _Shard(scratch, len(manifest["shards"]), n, bool(manifest.get("mask")))
      shard.append(result)
      if shard.tokens >= shard_tokens:
        _finish_shard(manifest, shard, path, progress)
        shard = None
    if shard is not None:
      _finish_shard(manifest, shard, path, progress)
  if invalid:
    logging.warning("%s: %s", sources.key(src), sources.describe_invalid(invalid))
  manifest["complete"] = True
  write_manifest(path, manifest)
  if not is_remote(path):  # a killed preparation's leftovers (nobody writes here once it is complete)
    for stale in path.glob(".writing-*"):
      shutil.rmtree(stale, ignore_errors=True)
  return manifest


class _Progress:
  """Tokens per second of this run (a resumed run's earlier shards not counted)."""

  def __init__(self, manifest: dict):
    self.started, self.before = time.time(), tokens_in(manifest)

  def line(self, manifest: dict) -> str:
    tokens = tokens_in(manifest)
    return f"{tokens:,} tokens so far, {(tokens - self.before) / max(time.time() - self.started, 1e-9):,.0f} tokens/s"


def tokens_in(manifest: dict) -> int:
  return sum(s[part]["tokens"] for s in manifest["shards"] for part in PARTS)


class _Shard:
  """The shard being written: both parts, and the chunks, documents and bytes of text it holds."""

  def __init__(self, scratch: str, index: int, first_chunk: int, masked: bool):
    self.scratch, self.index, self.first_chunk = scratch, index, first_chunk
    self.parts = {part: _PartFile(scratch, part, index, masked) for part in PARTS}
    self.chunks = self.documents = self.bytes = 0

  @property
  def tokens(self) -> int:
    return sum(p.tokens for p in self.parts.values())

  def append(self, result: dict) -> None:
    for part, file in self.parts.items():
      file.append(*result[part])
    self.chunks += 1
    self.documents += result["documents"]
    self.bytes += result["bytes"]


def _finish_shard(manifest: dict, shard: _Shard, path: epath.Path, progress: _Progress) -> None:
  """Puts the shard's files in place, then lists it in the manifest: a shard is listed only once whole."""
  manifest["shards"].append({
      "index": shard.index, "chunks": [shard.first_chunk, shard.first_chunk + shard.chunks],
      "documents": shard.documents, "bytes": shard.bytes,
      **{part: file.finish(shard.scratch, path) for part, file in shard.parts.items()}})
  write_manifest(path, manifest)
  logging.info("Prepared shard %d of %s: %s", shard.index, path.name, progress.line(manifest))


def repair(directory: str) -> list[str]:
  """Checks every shard file (CRC-32); from the first damaged shard on, the shards are dropped from the
  manifest, to be prepared again by the next `prepare` (the ones before are kept). The damaged files."""
  bad = verify(directory)
  manifest = read_manifest(directory)
  if bad and manifest is not None:
    first = min(shard_of(path) for path in bad)
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] < first]
    manifest["complete"] = False
    write_manifest(epath.Path(directory), manifest)
  return bad
