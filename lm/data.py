"""Token sequences and batches: tokenizers, packing, the batch arithmetic and the batch of every step.

No TensorFlow here (the corpus and its caches are `lm/corpus.py`'s): the train step and a benchmark on
synthetic tokens need only this module.

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
import os
from typing import Protocol

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm

from lm import sharding
from lm.config import ConfigError

PAD_ID = 0  # every tokenizer reserves id 0 for padding
ARRAYS = ("tokens", "segment_ids", "positions")


# ---------------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  fingerprint: str  # changes whenever the id mapping changes; part of the token cache key

  def encode(self, text: str) -> list[int]: ...
  def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
  def decode(self, ids) -> str: ...
  def describe(self) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes shifted past the special ids: pad 0, bos 1, eos 2, byte b -> b + 3."""

  vocab_size, pad_id, bos_id, eos_id = 259, PAD_ID, 1, 2
  fingerprint = "byte"
  _OFFSET = 3

  def encode(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self._OFFSET).tolist()

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.encode(text) for text in texts]

  def decode(self, ids) -> str:
    data = bytes(int(i) - self._OFFSET for i in ids if self._OFFSET <= int(i) < self.vocab_size)
    return data.decode("utf-8", errors="replace")

  def describe(self) -> str:
    return "byte 259"


class SentencePieceTokenizer:
  """A SentencePiece model whose pad id is 0."""

  def __init__(self, model_proto: bytes, path: str):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._path = path
    self.vocab_size = self._sp.vocab_size()
    self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
    self.fingerprint = "spm-" + hashlib.sha256(model_proto).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids) -> str:
    special = {self.pad_id, self.bos_id, self.eos_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in special])

  def describe(self) -> str:
    return f"sentencepiece {self.vocab_size} ({self._path})"


# ---------------------------------------------------------------------------------------------------
# Packing


@dataclasses.dataclass(frozen=True)
class PackedSequences:
  """One split, tokenized and packed into rows of seq_len, in a fixed order."""

  tokens: np.ndarray  # int32 [num_sequences, seq_len]
  segment_ids: np.ndarray  # int32 [N, L]; 0 = padding, 1, 2, ... = document pieces within the row
  positions: np.ndarray  # int32 [N, L]; position within its segment, from 0

  def __len__(self) -> int:
    return self.tokens.shape[0]


def pack(stream: np.ndarray, bos_id: int, seq_len: int) -> dict[str, np.ndarray]:
  """Cuts the stream into full rows; a document split across rows continues as a new segment."""
  rows = len(stream) // seq_len
  tokens = stream[:rows * seq_len].reshape(rows, seq_len).astype(np.int32)
  # bos marks every document start because encode never emits it; column 0 starts a continuation.
  starts = tokens == bos_id
  starts[:, 0] = True
  columns = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape)
  start_column = np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
  return {"tokens": tokens, "segment_ids": np.cumsum(starts, axis=1, dtype=np.int32),
          "positions": (columns - start_column).astype(np.int32)}


# ---------------------------------------------------------------------------------------------------
# Batches


class TrainBatches:
  """Random access to the global batch of every optimizer step: a function of (seed, step) only."""

  def __init__(self, data: PackedSequences, seed: int, global_batch_size: int):
    if global_batch_size > len(data):
      raise ConfigError(
          f"the train split has {len(data)} sequences of seq_len {data.tokens.shape[1]}, fewer than one "
          f"global batch of {global_batch_size}; lower config.train.micro_batch_size or "
          "config.train.gradient_accumulation_steps, or add text.")
    self._data = data
    self.global_batch_size = global_batch_size
    self.steps_per_epoch = len(data) // global_batch_size
    # grain reshuffles epoch e with seed + e, so raw seeds s and s + 1 would replay each other's epochs
    # one apart; hashing the seed keeps runs with nearby seeds unrelated.
    order_seed = int.from_bytes(hashlib.sha256(f"train-order-{seed}".encode()).digest()[:4], "little")
    self._order = grain.MapDataset.range(len(data)).shuffle(seed=order_seed).repeat(None)

  def indices(self, step: int, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
    """Rows of the data for this step: positions [step * G, (step + 1) * G) of the endless order, or the
    `rows` of them (a slice or an array of positions in the global batch)."""
    start = step * self.global_batch_size
    stream_positions = np.arange(start, start + self.global_batch_size)[rows]
    return np.fromiter((self._order[int(i)] for i in stream_positions), np.int64, count=len(stream_positions))

  def get(self, step: int, rows: slice | np.ndarray = slice(None)) -> dict[str, np.ndarray]:
    """The step's global batch, or the `rows` part of it (a process's share) without reading the rest."""
    indices = self.indices(step, rows)
    return {name: np.asarray(getattr(self._data, name)[indices], np.int32) for name in ARRAYS}


def eval_batches(data: PackedSequences, num_sequences: int, batch_size: int) -> list[dict[str, np.ndarray]]:
  """The first num_sequences rows in batches; the last batch is padded with all-zero rows."""
  if len(data) < num_sequences:
    logging.warning("The eval split has %d sequences, fewer than config.data.eval_sequences = %d; "
                    "evaluating on all of them.", len(data), num_sequences)
  count = min(num_sequences, len(data))
  batches = []
  for start in range(0, count, batch_size):
    stop = min(start + batch_size, count)
    batch = {name: np.zeros((batch_size, data.tokens.shape[1]), np.int32) for name in ARRAYS}
    for name in ARRAYS:
      batch[name][:stop - start] = getattr(data, name)[start:stop]
    batches.append(batch)
  return batches


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


def step_rows(mesh: jax.sharding.Mesh, plan: BatchPlan) -> np.ndarray:
  """Positions in the global batch of the rows this process's devices get, micro-batch after micro-batch:
  the only rows it reads."""
  in_micro_batch = sharding.process_rows(mesh, plan.micro_rows)
  return (np.arange(plan.accumulation_steps)[:, None] * plan.micro_rows + in_micro_batch).ravel()


def micro_batches(rows: dict[str, np.ndarray], plan: BatchPlan) -> dict[str, np.ndarray]:
  """A global batch, or a process's `step_rows` of it, as the train step takes it: [micro-batch, row, ...]
  (micro-batch i holds the consecutive rows i x micro_rows ..., each split over the devices in order, so
  the global batch is the same bytes whatever the split)."""
  return {k: v.reshape(plan.accumulation_steps, -1, *v.shape[1:]) for k, v in rows.items()}
