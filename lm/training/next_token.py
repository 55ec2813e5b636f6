"""Next-token training on a corpus, a kind of training for the loop (`lm.training.train`): pre-training on packed
documents, and supervised fine-tuning on conversations (a source of kind `chat`: the same loss, counted on
the assistant's tokens only, which the rows' `mask` marks).

What this kind supplies: the corpus's rows of each optimizer step (`lm.data.batching.TrainBatches`, a function of
the seed and the step), the language model's loss (`lm.training.train_step.token_losses`), and the loss over the
held-out rows as its eval.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from lm import distributed
from lm.data import batching, corpus
from lm.model import sharding
from lm.training import evaluate, runtime
from lm.training.train_step import token_losses


@dataclasses.dataclass
class NextToken:
  rt: runtime.Runtime
  batches: batching.TrainBatches
  eval_fn: Callable  # (params, batch) -> per-sequence loss sums and token counts
  eval_batches: batching.EvalBatches
  lines: list[tuple[str, str]]  # the start-up block's lines about the data
  # Eval before the first step of a fresh run: a fine-tuning run's figure of the model it starts from.
  evaluate_first: bool = False
  on_policy = False  # its rows depend on the seed and the step alone
  losses: Callable = token_losses

  def __post_init__(self):
    self._mine = batching.step_rows(self.rt.mesh, self.rt.plan)  # this process's rows of every step's batch

  @property
  def steps_per_epoch(self) -> int:
    return self.batches.steps_per_epoch

  def describe(self) -> list[tuple[str, str]]:
    return self.lines

  def start(self, fns: runtime.TrainFunctions, state, resumed: bool) -> None:
    del fns, state, resumed  # nothing kept from the starting state

  def batch(self, step: int, state) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """This process's rows of the step's global batch, [micro-batch, row, seq_len]; no figures of its own."""
    del state  # the rows depend on the seed and the step only
    return batching.micro_batches(self.batches.get(step, self._mine), self.rt.plan), {}

  def figures(self, fetched: dict, tokens: int) -> dict[str, float]:
    del fetched, tokens
    return {}

  def evaluate(self, state) -> dict[str, float]:
    with sharding.activate(self.rt.mesh):
      return evaluate.evaluate(self.eval_fn, state.model_params, self.eval_batches, self.rt.mesh)


def make(rt: runtime.Runtime) -> NextToken:
  """The config's corpus (process 0 prepares it on first use), its train and eval rows."""
  config, t = rt.config, rt.config.train
  with distributed.process_zero_first():
    tokenizer, prepared = corpus.prepare_all(config.data, config.model.vocab_size)
  batches = corpus.train_batches(prepared, t.seq_len, t.seed, rt.plan.global_sequences)
  eval_batches = corpus.eval_batches(config.data, prepared, t.seq_len, rt.plan.micro_rows)
  lines = [("Tokenizer", tokenizer.describe()),
           *[(f"Source {name}", p.describe()) for name, p in prepared.items()],
           ("Train rows", f"{batches.describe()} of {t.seq_len} tokens ({batches.steps_per_epoch:,} steps per epoch)"),
           ("Eval rows", corpus.describe_eval(config.data, eval_batches))]
  return NextToken(rt, batches, runtime.eval_function(rt), eval_batches, lines, evaluate_first=bool(t.init_from))
