"""Pure functions of the training: the loss (training's and eval's, `token_losses`), one optimizer step as one
program. No I/O.

Loss accounting is token-exact: a micro-batch's loss is the sum of its per-token cross-entropies divided by
the number of real tokens in the whole optimizer step (counted inside the program), and the micro-batch
gradients are summed. The gradient applied is therefore that of the global token mean, however the global
batch is split into micro-batches and devices. Per-sequence loss sums come back so that the host can add
them in a fixed order.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import PartitionSpec as P

from lm.data import batching
from lm.model import lora, sharding
from lm.model.decoder import Decoder, output_logits, output_weight
from lm.training.optimizer import grad_norm, skipped_updates


class TrainState(struct.PyTreeNode):
  params: Any  # what the optimizer trains: every parameter, or the LoRA adapters alone
  opt_state: optax.MultiStepsState
  frozen: Any = None  # the parameters held fixed (LoRA's base weights): an input of the step, never saved

  @property
  def model_params(self):
    """The whole parameter tree the model takes."""
    return lora.merge(self.frozen, self.params)

  def saved(self) -> dict:
    """What a checkpoint holds: {"params", "opt_state"} (the layout of every checkpoint so far; the
    accumulator in opt_state or not, restored into either: `lm.checkpoints.checkpoint.restore_state`)."""
    return {"params": self.params, "opt_state": self.opt_state}

  @property
  def step(self) -> jax.Array:
    """Optimizer steps taken."""
    return self.opt_state.gradient_step


def init_opt_state(tx: optax.MultiSteps, params, carry_accumulator: bool) -> optax.MultiStepsState:
  """MultiSteps' state, with its accumulator (acc_grads) only where `carry_accumulator`, else None.

  An optimizer step is one program (`train_step`), at whose end the accumulator is always zeros: the
  state need not keep it. Where the step scans micro-batches into it (accumulation > 1 without local
  accumulation), the state's buffer is the scan's carry, donated and updated in place: measured on
  XLA:TPU (llama_1_36b, v5e:2x4, 2 x 256) that peaks 0.38 GB per chip lower than a carry of zeros made in
  the program. Elsewhere (accumulation 1, local accumulation, the batch-invariant sum) nothing reads it:
  the state does without, the parameters' bytes less per device."""
  state = tx.init(params)
  return state if carry_accumulator else state._replace(acc_grads=None)


def token_logprobs(model: Decoder, params, batch, temperature: float = 1.0) -> jax.Array:
  """log p(next token) at every position [B, L], float32, of the logits divided by `temperature` (GRPO
  samples at a temperature and scores its tokens at it, as TRL).

  With config.model.logits_chunk = C < L, the float32 logits exist C positions at a time: a `lax.map`
  over the chunks, each checkpointed (its logits recomputed in the backward pass from the hidden states),
  so that [B, L, V] float32 is never held. The output projection stays sharded as a parameter: each chunk
  gathers it over fsdp and reduce-scatters its share of the gradient. Gathered once for all chunks instead,
  its whole float32 gradient was a loop carry from the start of the step to its end (0.26 GB per chip at a
  32k vocabulary and d_model 2048, one per micro-batch in flight): llama_1_36b at 8k on v5e:2x4 peaks
  0.66 GB lower so, for 3.7 GB more all-gather and collective-permute traffic per step.

  With `logit_positions` [B, W] in the batch, only those positions are projected (GRPO: a window over each
  row's completion, as TRL's logits_to_keep): [B, W] out, the prompt's logits never computed."""
  targets_BxL = batching.targets(batch["tokens"])
  chunk, cfg = model.cfg.logits_chunk, model.cfg

  def logprobs(x_BxCxD, targets_BxC, w_out_DxV):
    logits_BxCxV = output_logits(x_BxCxD, w_out_DxV, cfg)
    return -optax.softmax_cross_entropy_with_integer_labels(logits_BxCxV.astype(jnp.float32) / temperature,
                                                            targets_BxC)

  x_BxLxD = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"],
                        method=Decoder.hidden)
  if "logit_positions" in batch:
    positions_BxW = batch["logit_positions"]
    x_BxLxD = jnp.take_along_axis(x_BxLxD, positions_BxW[..., None], axis=1)
    targets_BxL = jnp.take_along_axis(targets_BxL, positions_BxW, axis=1)
  B, L = targets_BxL.shape
  w_out_DxV = output_weight(params, cfg)
  if not chunk or L <= chunk:
    return logprobs(x_BxLxD, targets_BxL, w_out_DxV)
  if L % chunk:
    raise ValueError(f"config.model.logits_chunk = {chunk} does not divide the sequence length {L}")
  split = lambda a: jnp.swapaxes(a.reshape(B, L // chunk, chunk, *a.shape[2:]), 0, 1)  # [n, B, C, ...]
  piece = jax.checkpoint(lambda x, t: logprobs(x, t, w_out_DxV))
  out_NxBxC = jax.lax.map(lambda xt: piece(*xt), (split(x_BxLxD), split(targets_BxL)))
  return jnp.swapaxes(out_NxBxC, 0, 1).reshape(B, L)


def token_losses(model: Decoder, params, batch) -> dict:
  """The language-model loss of a micro-batch, per sequence: the cross-entropy summed over the counted
  targets (`batching.target_mask`), float32 [B], and their count, int32 [B]. Training's loss and eval's."""
  mask_BxL = batching.target_mask(batch)
  ce_BxL = -token_logprobs(model, params, batch)
  return {"sequence_loss": jnp.sum(jnp.where(mask_BxL, ce_BxL, 0.0), axis=-1),
          "sequence_tokens": jnp.sum(mask_BxL, axis=-1, dtype=jnp.int32)}


def in_groups(losses: Callable, width: int) -> Callable:
  """`losses` (model, params, batch [R, ...]) run on `width` rows at a time, in a scan: each row's figures
  then come from the same shapes whatever R (config.train.batch_invariant's eval, `width` = rows per group
  x data-parallel devices: each device's group of rows)."""
  def run(model: Decoder, params, batch) -> dict:
    groups = jax.lax.with_sharding_constraint(_grouped(batch, width), P(None, sharding.BATCH_AXES))
    _, figures = jax.lax.scan(lambda carry, group: (carry, losses(model, params, group)), None, groups)
    return jax.tree.map(lambda f: f.reshape(-1, *f.shape[2:]), figures)
  return run


def _grouped(rows, width: int):
  """Every leaf's rows [R, ...] as [R / width, width, ...]: consecutive rows in groups of `width`."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // width, width, *x.shape[1:]), rows)


def loss_scale(batch) -> jax.Array:
  """1 / (real target tokens of the whole optimizer step), float32: every micro-batch's loss sum is
  scaled by it, so that the summed gradients are those of the step's token mean. The tokens that count are
  the batch's `mask` where it has one (GRPO: the completions), else every target of a document."""
  tokens = jnp.sum(batching.target_mask(batch), dtype=jnp.int32)
  return 1.0 / jnp.maximum(tokens, 1).astype(jnp.float32)


def train_step(state: TrainState, batch, *, model: Decoder, tx: optax.MultiSteps, accumulation_steps: int,
               local_axis: str | None = None, losses: Callable = token_losses, invariant_rows: int = 0):
  """One optimizer step in one program: the gradients of the k micro-batches, summed, then the update.

  Without `local_axis`, the first k - 1 micro-batches run in a `lax.scan` that adds each gradient to
  MultiSteps' accumulator by its own rule (`grad + acc`, in the accumulator's dtype), and the last
  micro-batch's gradient goes to `tx.update` (MultiSteps) entered at its last mini-step, so that
  MultiSteps itself adds it, runs the inner optimizer on the sum, restarts the accumulator and counts the
  step: bitwise what k MultiSteps micro-steps give. Entered with a constant mini-step, MultiSteps'
  selections between "update" and "only accumulate" are constants that XLA folds away: the program does
  the work of one update, not of k.

  With `local_axis` (the mesh's data axis, when it has several replicas and k > 1), each replica sums the
  gradients of its own rows of all k micro-batches and the replicas add their sums once (`_local_sum`):
  one all-reduce per optimizer step instead of one per micro-batch. The additions then come in another
  order (within float32 rounding of the sum; tests/test_train_step.py), and MultiSteps gets the sum with
  an empty accumulator.

  With `invariant_rows` (config.train.batch_invariant), the gradient is summed in one order whatever the
  split (`_ordered_sum`): bitwise the same step on every micro-batch size, accumulation and data-parallel
  device count of the same global batch; `local_axis` is then the data axis (or None on one device).

  Args:
    batch: tokens, segment_ids, positions, each [k, micro_batch_size x data-parallel devices, seq_len]:
      the global batch, micro-batch after micro-batch, each micro-batch's rows split over the devices
      (and whatever else `losses` reads: GRPO's mask, advantages and log-probabilities).
    losses: (model, params, micro-batch) -> per-sequence figures, among them "sequence_loss" (summed over
      the counted tokens) and "sequence_tokens"; the language-model loss by default.
    accumulation_steps: k, as `tx` (MultiSteps) was made with: checked against the batch.
  Returns:
    (new state, metrics): per-sequence loss sums and token counts [k x rows] in global row order, the
    gradient norm and the count of skipped updates.
  """
  k = batch["tokens"].shape[0]
  if k != accumulation_steps:  # MultiSteps would then never reach its update: a silent no-op step
    raise ValueError(f"the step's batch holds {k} micro-batches, the optimizer accumulates {accumulation_steps}")
  scale = loss_scale(batch)
  opt_state = state.opt_state
  # MultiSteps' accumulator as its init makes it (its dtype), a constant: XLA adds it for free.
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(tx.init, state.params).acc_grads)
  if invariant_rows:
    grads, figures = _ordered_sum(model, losses, state.params, state.frozen, batch, scale, zeros, local_axis,
                                  invariant_rows)
    acc_grads = zeros
  elif local_axis is not None and k > 1:
    grads, figures = _local_sum(model, losses, state.params, state.frozen, batch, scale, zeros, local_axis)
    acc_grads = zeros
  else:
    last_batch = jax.tree.map(lambda x: x[-1], batch)
    if k > 1:  # the scan's carry in the state's own accumulator buffer (donated) where it carries one
      carry = zeros if opt_state.acc_grads is None else opt_state.acc_grads
      acc_grads, head_figures = jax.lax.scan(_accumulate(model, losses, state.params, state.frozen, scale),
                                             carry, jax.tree.map(lambda x: x[:-1], batch))
      # The last micro-batch after the others, not beside them: independent of the scan, its forward pass
      # was scheduled before the scan's backward passes, holding two micro-batches' activations at once
      # (XLA:TPU, llama_1_36b at 8k on v5e:2x4). An identity: the same values.
      acc_grads, last_batch = jax.lax.optimization_barrier((acc_grads, last_batch))
    else:  # nothing accumulated
      acc_grads, head_figures = zeros, None
    grads, figures = gradient(model, state.params, state.frozen, last_batch, scale, losses)
    if head_figures is not None:
      figures = jax.tree.map(lambda h, f: jnp.concatenate([h.reshape(-1), f]), head_figures, figures)
  last = opt_state._replace(mini_step=jnp.asarray(k - 1, opt_state.mini_step.dtype), acc_grads=acc_grads)
  updates, opt_state = tx.update(grads, last, state.params)
  if state.opt_state.acc_grads is None:  # MultiSteps restarted it to zeros: not kept (`init_opt_state`)
    opt_state = opt_state._replace(acc_grads=None)
  params = optax.apply_updates(state.params, updates)
  return (TrainState(params=params, opt_state=opt_state, frozen=state.frozen),
          {**figures, "grad_norm": grad_norm(opt_state), "skipped_updates": skipped_updates(opt_state)})


def _accumulate(model: Decoder, losses: Callable, params, frozen, scale):
  """The scan body: one micro-batch's gradient added to the accumulator (MultiSteps' rule, its dtype)."""
  def accumulate(acc, micro_batch):
    grads, figures = gradient(model, params, frozen, micro_batch, scale, losses)
    return jax.tree.map(lambda g, a: (g + a).astype(a.dtype), grads, acc), figures
  return accumulate


def _local_sum(model: Decoder, losses: Callable, params, frozen, batch, scale, acc_grads, axis: str):
  """(sum of the gradients of all micro-batches, per-sequence figures flattened in global row order):
  each replica along `axis` accumulates the gradients of its rows, then one psum adds the replicas'
  sums."""
  def local(params, frozen, batch, scale, acc_grads):
    acc_grads, figures = jax.lax.scan(_accumulate(model, losses, params, frozen, scale), acc_grads, batch)
    return jax.lax.psum(acc_grads, axis), figures

  summed, figures = _per_replica(local, axis)(params, frozen, batch, scale, acc_grads)
  # In the parameters' dtype, as MultiSteps hands the sum of micro-batch gradients to the inner optimizer.
  return optax.tree.cast_like(summed, params), jax.tree.map(lambda f: f.reshape(-1), figures)


def _per_replica(local: Callable, axis: str) -> Callable:
  """`local`(params, frozen, rows [n, rows, ...], scale, accumulator) -> (summed, figures [n, rows]) run by
  each replica along `axis` on its own rows (`jax.shard_map` manual over `axis` alone: the other mesh axes
  stay with the compiler), the figures laid out again over the replicas."""
  def manual(*args):
    with sharding.rules_within(axis):
      return local(*args)

  return jax.shard_map(manual, in_specs=(P(), P(), P(None, axis), P(), P()), out_specs=(P(), P(None, axis)),
                       axis_names=frozenset({axis}), check_vma=False)


def _ordered_sum(model: Decoder, losses: Callable, params, frozen, batch, scale, acc_grads, axis: str | None,
                 rows: int):
  """(the step's summed gradient, per-sequence figures in global row order), the sum the same bits on every
  split of the global batch: the G rows in groups of `rows` consecutive rows, each group's gradient
  computed alone (the same shapes whatever the micro-batch and device count) and added to the sum in
  global row order, ((g_0 + g_1) + g_2) + ..., in the accumulator's dtype.

  On D data-parallel devices (manual over `axis`), scan step t has device d compute group t x D + d (the
  batch regrouped so), then each device sends slice e of its flattened gradient to device e (an
  all-to-all, the bytes of a reduce-scatter) and adds the D slices it receives in device order: device e
  holds slice e of the sum, added in the order of one device. One all-gather of the slices at the end."""
  devices = 1 if axis is None else jax.sharding.get_abstract_mesh().shape[axis]
  rows_in_order = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)  # [k x rows, ...]: global order
  groups = _grouped(rows_in_order, devices * rows)
  slices = jax.tree.map(lambda a: jnp.zeros(-(-a.size // devices), a.dtype), acc_grads)

  def add(acc, grad):
    flat = jnp.pad(grad.reshape(-1).astype(acc.dtype), (0, acc.size * devices - grad.size)).reshape(devices, -1)
    parts = flat if axis is None else jax.lax.all_to_all(flat, axis, 0, 0, tiled=True)  # row e: device e's
    for e in range(devices):
      acc = acc + parts[e]
    return acc

  def local(params, frozen, groups, scale, slices):
    def step(acc, group):
      grads, figures = gradient(model, params, frozen, group, scale, losses)
      return jax.tree.map(add, acc, grads), figures

    summed, figures = jax.lax.scan(step, slices, groups)
    if axis is not None:
      summed = jax.tree.map(lambda s: jax.lax.all_gather(s, axis, tiled=True), summed)
    return summed, figures

  summed, figures = (local if axis is None else _per_replica(local, axis))(params, frozen, groups, scale, slices)
  summed = jax.tree.map(lambda s, a: s[:a.size].reshape(a.shape), summed, acc_grads)
  return optax.tree.cast_like(summed, params), jax.tree.map(lambda f: f.reshape(-1), figures)


def gradient(model: Decoder, params, frozen, batch, scale, losses: Callable = token_losses):
  """(gradient of the micro-batch's loss sum x `scale` with respect to `params`, the per-sequence figures
  of `losses`); `frozen` (LoRA's base weights, or None) joins `params` in the model, ungraded."""
  def loss_fn(params):
    figures = losses(model, lora.merge(frozen, params), batch)
    return jnp.sum(figures["sequence_loss"]) * scale, figures

  return jax.grad(loss_fn, has_aux=True)(params)
