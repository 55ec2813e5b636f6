"""Token sequences and batches: rows cut from the prepared token stores (`lm/data/token_store.py`), with segment
ids and positions derived from their document ends; the batch arithmetic; the batch of every step (of one
source or a mixture); the eval batches.

No TensorFlow here (the corpus and its preparation are `lm/data/corpus.py`'s and `lm/data/prepare.py`'s): the train
step and a benchmark on synthetic tokens need only this module.

Batch arithmetic (all per optimizer step):
  micro_batch_size            sequences per device per forward/backward pass
  gradient_accumulation_steps micro-batches each device accumulates (per device, so scaling devices
                              needs no config change)
  global batch                micro_batch_size x gradient_accumulation_steps x data-parallel devices
Each process draws its rows of the global batch of step s (a function of seed and s: one process draws
them all), as gradient_accumulation_steps micro-batches, each split over the data-parallel devices in
order: the devices get the same rows whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Protocol

import grain
import jax
import jax.numpy as jnp
import numpy as np

from lm.data.token_store import TokenStore
from lm.errors import ConfigError
from lm.model import sharding

ARRAYS = ("tokens", "segment_ids", "positions")
# bool [rows, seq_len]: position p's target (token p + 1) counts in the loss. Only in the batches of a corpus
# with a chat source (SFT: the assistant's tokens; a text source's rows there: `loss_mask`); a corpus without
# one has no mask, and its batches are those of pre-training, unchanged.
MASK = "mask"


def segments(length: int, boundaries: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """Segment ids (1, 2, ... from column 0) and positions of a row whose documents start at `boundaries`
  (column 0 starts one too: a document cut by the previous row continues as a new segment)."""
  starts = np.zeros(length, bool)
  starts[boundaries] = True
  return _from_starts(starts)


def _from_starts(starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Segment ids and positions of rows [..., L] whose True entries start a segment (column 0 always)."""
  starts = starts.copy()
  starts[..., 0] = True
  columns = np.broadcast_to(np.arange(starts.shape[-1], dtype=np.int32), starts.shape)
  start_column = np.maximum.accumulate(np.where(starts, columns, 0), axis=-1)
  return np.cumsum(starts, axis=-1, dtype=np.int32), (columns - start_column).astype(np.int32)


# ---------------------------------------------------------------------------------------------------
# Sequences: rows of seq_len tokens


class Sequences(Protocol):
  seq_len: int
  masked: bool  # its rows hold MASK too

  def __len__(self) -> int: ...
  def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...  # int32 [len(indices), seq_len] each


class StoredSequences:
  """A token store cut into rows of seq_len: row i is tokens [i L, (i + 1) L) of the stream (the tail
  that does not fill a row is not used)."""

  masked = False

  def __init__(self, store: TokenStore, seq_len: int):
    self.store, self.seq_len = store, seq_len

  def __len__(self) -> int:
    return self.store.num_tokens // self.seq_len

  def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    out = {name: np.empty((len(indices), self.seq_len), np.int32) for name in ARRAYS}
    for n, i in enumerate(indices):
      tokens, boundaries = self.store.read(int(i) * self.seq_len, (int(i) + 1) * self.seq_len)
      out["tokens"][n] = tokens
      out["segment_ids"][n], out["positions"][n] = segments(self.seq_len, boundaries)
    return out


class ConversationSequences:
  """A masked store (a chat source's conversations) packed into rows whole, as TRL's packing keeps them (here
  next-fit in stream order, a layout that depends on the data alone): each conversation in the current row
  when it fits, else in a new one; each its own segment, never cut across rows, the rest of a row padding
  (segment 0). A conversation longer than seq_len is truncated to its first seq_len tokens (counted).
  MASK[p]: token p + 1 is learned, in p's conversation."""

  masked = True

  def __init__(self, store: TokenStore, seq_len: int):
    self.store, self.seq_len = store, seq_len
    ends = store.document_ends()
    self._starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    self._lengths = np.minimum(ends - self._starts, seq_len)
    self.truncated = int(np.sum(ends - self._starts > seq_len))
    self._first = pack_greedily(self._lengths, seq_len)  # [rows + 1]: each row's first conversation

  def __len__(self) -> int:
    return len(self._first) - 1

  def describe(self) -> str:
    return (f"{len(self._lengths):,} conversations packed into {len(self):,} rows, {self.truncated:,} truncated "
            "to seq_len")

  def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    out = {name: np.zeros((len(indices), self.seq_len), np.int32) for name in ARRAYS}
    learned = np.zeros((len(indices), self.seq_len), bool)
    for n, i in enumerate(indices):
      first, stop = int(self._first[i]), int(self._first[i + 1])
      lengths = self._lengths[first:stop]
      # A row's conversations are consecutive in the stream (a truncated one is alone in its row): one read.
      start, column = int(self._starts[first]), int(lengths.sum())
      if column:
        out["tokens"][n, :column] = self.store.read(start, start + column)[0]
        learned[n, :column] = self.store.read_mask(start, start + column)
      out["segment_ids"][n, :column] = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
      out["positions"][n, :column] = np.arange(column) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[MASK] = loss_mask(out["segment_ids"]) & targets(learned)  # the next token is learned, in the segment
    return out


def pack_greedily(lengths: np.ndarray, seq_len: int) -> np.ndarray:
  """The first item of each row (and the item count last) when items of `lengths` (each <= seq_len) go in
  order into rows of seq_len, each into the current row when it fits, else into a new one."""
  first, used = [0], 0
  for n, length in enumerate(lengths.tolist()):
    if used + length > seq_len:
      first.append(n)
      used = 0
    used += length
  return np.asarray(first + [len(lengths)] if len(lengths) else [0], np.int64)


@dataclasses.dataclass(frozen=True)
class PackedSequences:
  """Rows held in memory (synthetic data, tests)."""

  tokens: np.ndarray  # int32 [num_sequences, seq_len]
  segment_ids: np.ndarray  # int32 [N, L]; 0 = padding, 1, 2, ... = document pieces within the row
  positions: np.ndarray  # int32 [N, L]; position within its segment, from 0
  mask: np.ndarray | None = None  # bool [N, L]: MASK, SFT's rows (synthetic ones: scripts/benchmark.py)

  @property
  def masked(self) -> bool:
    return self.mask is not None

  @property
  def seq_len(self) -> int:
    return self.tokens.shape[1]

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    out = {name: np.asarray(getattr(self, name)[indices], np.int32) for name in ARRAYS}
    return out if self.mask is None else {**out, MASK: self.mask[indices]}


def pack(stream: np.ndarray, document_starts: np.ndarray, seq_len: int) -> PackedSequences:
  """A token stream cut into full rows in memory; `document_starts` are the stream offsets of documents."""
  rows = len(stream) // seq_len
  tokens = stream[:rows * seq_len].reshape(rows, seq_len).astype(np.int32)
  starts = np.zeros(rows * seq_len, bool)
  starts[document_starts[document_starts < rows * seq_len]] = True
  return PackedSequences(tokens, *_from_starts(starts.reshape(rows, seq_len)))


# ---------------------------------------------------------------------------------------------------
# Batches

_MIXTURE_BLOCK = 1024  # positions per block; in each block every source has its weight's share, exactly


def _hashed_seed(text: str) -> int:
  # grain reshuffles epoch e with seed + e, so raw seeds s and s + 1 would replay each other's epochs
  # one apart; hashing keeps runs with nearby seeds (and the sources of a mixture) unrelated.
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def mixture_counts(weights: list[float], block: int = _MIXTURE_BLOCK) -> np.ndarray:
  """Positions of each source in a block: its weight's share, rounded by largest remainder."""
  share = np.asarray(weights, np.float64) / sum(weights) * block
  counts = np.floor(share).astype(np.int64)
  remainder_order = np.argsort(-(share - counts), kind="stable")
  counts[remainder_order[:block - counts.sum()]] += 1
  return counts


class TrainBatches:
  """Random access to the global batch of every optimizer step: a function of (seed, step) only.

  The global batches are consecutive positions of an endless stream. With one source, position p is row
  order[p] of an endless reshuffled order of its rows (a new shuffle each epoch). With several (a
  mixture), positions go in blocks of 1,024: in each block every source gets its weight's share of the
  positions, in a seeded random arrangement, and takes them from its own endless order; so the
  proportions hold in every block, and position p is found without reading anything before it."""

  def __init__(self, sources: dict[str, Sequences], seed: int, global_batch_size: int,
               weights: dict[str, float] | None = None):
    weights = weights or {name: 1.0 for name in sources}
    self._names = [name for name in sources if weights[name] > 0]
    self._sources = [sources[name] for name in self._names]
    total = sum(len(s) for s in self._sources)
    if global_batch_size > total or not all(len(s) for s in self._sources):
      sizes = ", ".join(f"{name} {len(s)}" for name, s in zip(self._names, self._sources))
      seq_len = self._sources[0].seq_len
      raise ConfigError(
          f"the train split has {sizes} sequences of seq_len {seq_len}: fewer than one global batch of "
          f"{global_batch_size} (or none in a source); lower config.train.micro_batch_size or "
          "config.train.gradient_accumulation_steps, or add text.")
    self.global_batch_size = global_batch_size
    self.steps_per_epoch = total // global_batch_size
    self._orders = [grain.MapDataset.range(len(s)).shuffle(seed=_hashed_seed(
        f"train-order-{seed}" if len(self._names) == 1 else f"train-order-{seed}-{name}")).repeat(None)
        for name, s in zip(self._names, self._sources)]
    self._counts = mixture_counts([weights[name] for name in self._names])
    if not self._counts.all():
      starved = [name for name, count in zip(self._names, self._counts) if not count]
      raise ConfigError(f"config.data.sources: the weights of {starved} are below 1/{2 * _MIXTURE_BLOCK:,} of the "
                        "total, which rounds to no row at all; raise them, or set them to 0.")
    self._mixture_seed = _hashed_seed(f"mixture-{seed}")
    self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def describe(self) -> str:
    if len(self._sources) == 1:
      return f"{len(self._sources[0]):,} sequences{_packing(self._sources[0])}"
    shares = self._counts / self._counts.sum()
    return "a mixture of " + ", ".join(f"{name} {share:.1%} ({len(s):,} sequences{_packing(s)})"
                                       for name, share, s in zip(self._names, shares, self._sources))

  def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, rank among that source's positions) of each position of a block."""
    if block not in self._blocks:
      rng = np.random.default_rng([self._mixture_seed, block])
      source = rng.permutation(np.repeat(np.arange(len(self._counts)), self._counts))
      rank = np.empty(len(source), np.int64)
      for j in range(len(self._counts)):
        rank[source == j] = np.arange(self._counts[j])
      self._blocks = {block: (source, rank)} if len(self._blocks) > 8 else {**self._blocks, block: (source, rank)}
    return self._blocks[block]

  def locate(self, step: int, rows: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """(source, row of that source) of this step's positions [step G, (step + 1) G), or the `rows` of
    them (a slice or an array of positions in the global batch)."""
    start = step * self.global_batch_size
    positions = np.arange(start, start + self.global_batch_size, dtype=np.int64)[rows]
    if len(self._sources) == 1:
      source, nth = np.zeros(len(positions), np.int64), positions
    else:
      source, nth = np.empty(len(positions), np.int64), np.empty(len(positions), np.int64)
      for n, p in enumerate(positions):
        block, offset = divmod(int(p), _MIXTURE_BLOCK)
        block_source, rank = self._block(block)
        source[n] = block_source[offset]
        nth[n] = block * self._counts[source[n]] + rank[offset]
    index = np.fromiter((self._orders[s][int(i)] for s, i in zip(source, nth)), np.int64, count=len(nth))
    return source, index

  def indices(self, step: int, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
    """The rows of their sources that this step reads (with one source: its rows)."""
    return self.locate(step, rows)[1]

  def get(self, step: int, rows: slice | np.ndarray = slice(None)) -> dict[str, np.ndarray]:
    """The step's global batch, or the `rows` part of it (a process's share) without reading the rest."""
    return _gather(self._sources, *self.locate(step, rows))


def _empty(sources: list[Sequences], rows: int) -> dict[str, np.ndarray]:
  """Zeroed batch arrays of `rows` rows: ARRAYS, and MASK when a source has one (all False: padding)."""
  out = {name: np.zeros((rows, sources[0].seq_len), np.int32) for name in ARRAYS}
  if any(s.masked for s in sources):
    out[MASK] = np.zeros((rows, sources[0].seq_len), bool)
  return out


def _packing(sequences: Sequences) -> str:
  """How a chat source's rows were packed (its conversations, the truncated ones), for describe()."""
  return f": {sequences.describe()}" if isinstance(sequences, ConversationSequences) else ""


def _gather(sources: list[Sequences], source: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
  """The rows (source[n], index[n]) in order, each source read once for all of its rows. With a masked
  source among them, a text source's rows get MASK too: every target inside a document."""
  out = _empty(sources, len(index))
  for j in np.unique(source):
    where = np.flatnonzero(source == j)
    rows = sources[j].rows(index[where])
    if MASK in out and MASK not in rows:
      rows[MASK] = loss_mask(rows["segment_ids"])
    for name, array in rows.items():
      out[name][where] = array
  return out


class EvalBatches:
  """Eval rows in batches of `batch_size`, read when a batch is asked for; the last batch is padded with
  rows of segment id 0 (masked). All rows of every source, or a random sample of `num_sequences` of them
  (0 = all), the same for every run of the data whatever its train.seed, so that runs compare."""

  def __init__(self, sources: list[Sequences], num_sequences: int, batch_size: int):
    self._sources, self.batch_size = sources, batch_size
    sizes = [len(s) for s in sources]
    self.available = sum(sizes)
    chosen = np.arange(self.available, dtype=np.int64)
    if 0 < num_sequences < self.available:
      rng = np.random.default_rng(_hashed_seed("eval-sample"))
      chosen = np.sort(rng.choice(self.available, num_sequences, replace=False))
    offsets = np.cumsum([0] + sizes)
    self._source = np.searchsorted(offsets, chosen, side="right") - 1
    self._index = chosen - offsets[self._source]
    self.num_sequences = len(chosen)

  def describe(self) -> str:
    if self.num_sequences == self.available:
      return f"all {self.available:,} sequences"
    return f"a seeded random sample of {self.num_sequences:,} of the {self.available:,} sequences"

  def __len__(self) -> int:
    return -(-self.num_sequences // self.batch_size)

  def __getitem__(self, b: int) -> dict[str, np.ndarray]:
    return self.get(b)

  def get(self, b: int, rows: slice | np.ndarray = slice(None)) -> dict[str, np.ndarray]:
    """Batch b, or its `rows` (a process's share) without reading the others."""
    if not 0 <= b < len(self):
      raise IndexError(b)
    positions = np.arange(b * self.batch_size, (b + 1) * self.batch_size)[rows]
    real = positions < self.num_sequences
    out = _empty(self._sources, len(positions))
    for name, array in _gather(self._sources, self._source[positions[real]], self._index[positions[real]]).items():
      out[name][real] = array
    return out


def targets(tokens):
  """Next-token targets: tokens shifted left by one, the last column 0. numpy or jax arrays."""
  xp = np if isinstance(tokens, np.ndarray) else jnp
  return xp.concatenate([tokens[..., 1:], xp.zeros_like(tokens[..., :1])], axis=-1)


def loss_mask(segment_ids):
  """True where a token's target is the next token of the same segment. numpy or jax arrays."""
  xp = np if isinstance(segment_ids, np.ndarray) else jnp
  current, following = segment_ids[..., :-1], segment_ids[..., 1:]
  has_target = (current != 0) & (following == current)
  return xp.concatenate([has_target, xp.zeros_like(has_target[..., :1])], axis=-1)


def target_mask(batch):
  """Where a position's target counts in the loss and its token count: the batch's `mask` where it has one
  (SFT: the assistant's tokens; GRPO: the completions), else every target inside a document."""
  return batch[MASK] if MASK in batch else loss_mask(batch["segment_ids"])


# ---------------------------------------------------------------------------------------------------
# Batch arithmetic


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  micro_batch_size: int
  accumulation_steps: int
  data_parallel: int
  seq_len: int

  @property
  def micro_rows(self) -> int:
    """Rows of one micro-step across all data-parallel devices."""
    return self.micro_batch_size * self.data_parallel

  @property
  def global_sequences(self) -> int:
    return self.micro_rows * self.accumulation_steps

  @property
  def tokens_per_step(self) -> int:
    return self.global_sequences * self.seq_len

  def describe(self) -> list[tuple[str, str]]:
    return [
        ("Micro batch", f"{self.micro_batch_size} sequences per device"),
        ("Gradient accum steps", f"{self.accumulation_steps} per device | "
                                 f"{self.accumulation_steps * self.data_parallel} global"),
        ("Effective batch", f"{self.micro_batch_size} x {self.accumulation_steps} x {self.data_parallel} = "
                            f"{self.global_sequences:,} sequences = {self.tokens_per_step:,} tokens"),
    ]


def batch_plan(micro_batch_size: int, accumulation_steps: int, seq_len: int,
               mesh: jax.sharding.Mesh) -> BatchPlan:
  return BatchPlan(micro_batch_size, accumulation_steps, sharding.data_parallel_size(mesh), seq_len)


def step_rows(mesh: jax.sharding.Mesh, plan: BatchPlan, devices=None) -> np.ndarray:
  """Positions in the global batch of the rows this process's devices (or `devices`) get, micro-batch after
  micro-batch, ascending: the only rows it reads."""
  in_micro_batch = sharding.process_rows(mesh, plan.micro_rows, devices)
  return (np.arange(plan.accumulation_steps)[:, None] * plan.micro_rows + in_micro_batch).ravel()


def micro_batches(rows: dict[str, np.ndarray], plan: BatchPlan) -> dict[str, np.ndarray]:
  """A global batch, or a process's `step_rows` of it, as the train step takes it: [micro-batch, row, ...]
  (micro-batch i holds the consecutive rows i x micro_rows ..., each split over the devices in order, so
  the global batch is the same bytes whatever the split)."""
  return {k: v.reshape(plan.accumulation_steps, -1, *v.shape[1:]) for k, v in rows.items()}
