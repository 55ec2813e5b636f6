"""Pure functions of the training: the loss, one micro-step of training, one eval batch. No I/O.

Loss accounting is token-exact: a micro-batch's loss is the sum of its per-token cross-entropies divided by
the number of real tokens in the whole optimizer step (`loss_scale` = 1 / that count), and MultiSteps sums
the micro-batch gradients. The gradient applied is therefore that of the global token mean, however the
global batch is split into micro-batches and devices. Per-sequence loss sums come back so that the host
can add them in a fixed order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lm import data
from lm.model import Decoder
from lm.optimizer import grad_norm, skipped_updates


class TrainState(struct.PyTreeNode):
  params: Any
  opt_state: optax.MultiStepsState

  @property
  def step(self) -> jax.Array:
    """Optimizer steps taken (micro-steps do not count)."""
    return self.opt_state.gradient_step


def sequence_losses(model: Decoder, params, batch) -> tuple[jax.Array, jax.Array]:
  """Sum of per-token cross-entropy and number of real target tokens, per sequence: float32 [B], int32 [B]."""
  tokens_BxL, segment_ids_BxL = batch["tokens"], batch["segment_ids"]
  logits_BxLxV = model.apply({"params": params}, tokens_BxL, segment_ids_BxL, batch["positions"])
  mask_BxL = data.loss_mask(segment_ids_BxL)
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), data.targets(tokens_BxL))
  return jnp.sum(jnp.where(mask_BxL, ce_BxL, 0.0), axis=-1), jnp.sum(mask_BxL, axis=-1, dtype=jnp.int32)


def train_step(state: TrainState, batch, loss_scale, *, model: Decoder, tx: optax.MultiSteps):
  """One micro-step as `optax.MultiSteps` defines it: the gradient of this micro-batch, accumulated; every
  k-th call also updates params. The specification of the two steps the loop runs instead,
  `accumulate_step` and `update_step`, which compute the same states (tests/test_train_step.py: bitwise,
  but for the sign of zero in the restarted accumulator, which MultiSteps multiplies by 0) without the
  work MultiSteps does for the outcome it discards.

  Args:
    batch: tokens, segment_ids, positions, each [micro_batch_size x data-parallel devices, seq_len].
    loss_scale: 1 / (real target tokens in the whole optimizer step), float32 scalar.
  """

  grads, metrics = _gradient(model, state.params, batch, loss_scale)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(params=params, opt_state=opt_state), _with_optimizer_figures(metrics, opt_state)


def accumulate_step(state: TrainState, batch, loss_scale, *, model: Decoder):
  """A micro-step before the last of its optimizer step: adds its gradient to the accumulator, and only
  that. `train_step` (MultiSteps) would also run the whole optimizer and throw its result away: on a
  60M model that is 2.9x the memory traffic of this step (docs/performance.md)."""
  grads, metrics = _gradient(model, state.params, batch, loss_scale)
  opt_state = state.opt_state
  acc_grads = jax.tree.map(lambda g, acc: (g + acc).astype(acc.dtype), grads, opt_state.acc_grads)
  opt_state = opt_state._replace(mini_step=opt_state.mini_step + 1, acc_grads=acc_grads)
  return state.replace(opt_state=opt_state), _with_optimizer_figures(metrics, opt_state)


def update_step(state: TrainState, batch, loss_scale, *, model: Decoder, tx: optax.MultiSteps,
                accumulation_steps: int):
  """The last micro-step of an optimizer step: adds its gradient to the accumulated ones, runs the inner
  optimizer on the sum, applies it and restarts the accumulator from zeros. MultiSteps' `update` computes
  the optimizer's outcome and the accumulate-only outcome, both, and selects one with `where` inside a
  `lax.cond`: 2.5 GB more memory traffic per step on the 60M benchmark model (docs/performance.md).
  With `accumulation_steps` = 1 the accumulator is not read or written at all (it stays zero)."""
  grads, metrics = _gradient(model, state.params, batch, loss_scale)
  opt_state = state.opt_state
  if accumulation_steps == 1:
    total, acc_grads = grads, opt_state.acc_grads
  else:
    total = jax.tree.map(lambda g, acc: (g + acc).astype(acc.dtype), grads, opt_state.acc_grads)
    acc_grads = jax.tree.map(jnp.zeros_like, opt_state.acc_grads)
  updates, inner_opt_state = tx.inner_opt.update(optax.tree.cast_like(total, grads),
                                                 opt_state.inner_opt_state, state.params)
  opt_state = opt_state._replace(mini_step=jnp.zeros_like(opt_state.mini_step),
                                 gradient_step=optax.safe_increment(opt_state.gradient_step),
                                 inner_opt_state=inner_opt_state, acc_grads=acc_grads)
  params = optax.apply_updates(state.params, updates)
  return TrainState(params=params, opt_state=opt_state), _with_optimizer_figures(metrics, opt_state)


def _gradient(model: Decoder, params, batch, loss_scale):
  def loss_fn(params):
    seq_loss_B, seq_tokens_B = sequence_losses(model, params, batch)
    return jnp.sum(seq_loss_B) * loss_scale, (seq_loss_B, seq_tokens_B)

  grads, (seq_loss_B, seq_tokens_B) = jax.grad(loss_fn, has_aux=True)(params)
  return grads, {"sequence_loss": seq_loss_B, "sequence_tokens": seq_tokens_B}


def _with_optimizer_figures(metrics, opt_state):
  return {**metrics, "grad_norm": grad_norm(opt_state), "skipped_updates": skipped_updates(opt_state)}


def eval_step(params, batch, *, model: Decoder):
  """Loss sum and token count of one batch (padding rows count nothing)."""
  seq_loss_B, seq_tokens_B = sequence_losses(model, params, batch)
  return {"sequence_loss": seq_loss_B, "sequence_tokens": seq_tokens_B}
