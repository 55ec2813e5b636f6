"""Synthetic packed data for benchmarks and hardware checks: uniform random tokens in documents of random
length, packed into rows as prepared corpora are (lm.data.batching.pack)."""

from __future__ import annotations

import dataclasses

import numpy as np

from lm.config import Config
from lm.data import batching

BOS_ID = 1  # the byte tokenizer's: pad 0, bos 1, eos 2 (only the packing's document starts need it)
MEAN_DOCUMENT_TOKENS = 600  # a typical mix of whole and split documents per row


def sequences(config: Config, rows: int, seed: int = 0, sft: bool = False) -> batching.PackedSequences:
  """Uniform random tokens in documents of random length, packed as the real data is. `sft`: each
  document a conversation whose second half is the answer, the loss on it alone (SFT's mask)."""
  rng = np.random.default_rng(seed)
  stream = rng.integers(3, config.model.vocab_size, rows * config.train.seq_len, dtype=np.int32)
  starts = np.flatnonzero(rng.random(stream.shape) < 1 / MEAN_DOCUMENT_TOKENS)
  stream[starts] = BOS_ID
  packed = batching.pack(stream, starts, config.train.seq_len)
  if not sft:
    return packed
  length = np.diff(np.append(np.flatnonzero(packed.positions.ravel() == 0), packed.positions.size))
  answer = (packed.positions.ravel() >= np.repeat(length // 2, length)).reshape(packed.positions.shape)
  learned = np.concatenate([answer[:, 1:], np.zeros_like(answer[:, :1])], axis=1)  # of the targets
  return dataclasses.replace(packed, mask=batching.loss_mask(packed.segment_ids) & learned)
