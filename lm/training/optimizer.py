"""The optax chain: schedule, clipping, AdamW or Lion with a decay mask, inside `optax.MultiSteps`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lm.config import TrainConfig

NO_DECAY = ("scale", "bias")  # parameter names that weight decay skips: norms and biases


def learning_rate_schedule(cfg: TrainConfig, num_train_steps: int) -> optax.Schedule:
  """Learning rate of the update made after `count` earlier updates (count = optimizer step - 1).

  Warmup is linear from peak / warmup_steps (not from 0: the first update is not wasted), then
  cosine or linear decay to `final_learning_rate_ratio` x peak at the last step, or constant.
  """
  peak, warmup = cfg.learning_rate, cfg.warmup_steps
  final = peak * cfg.final_learning_rate_ratio
  decay_steps = max(num_train_steps - warmup, 1)

  def schedule(count, xp=jnp):
    """`xp=np` evaluates it on the host, without queueing behind the device's work."""
    count = xp.asarray(count, xp.float32)
    warm = peak * xp.minimum(count + 1.0, float(max(warmup, 1))) / max(warmup, 1)
    progress = xp.clip((count + 1.0 - warmup) / decay_steps, 0.0, 1.0)
    if cfg.schedule == "cosine":
      decayed = final + (peak - final) * 0.5 * (1.0 + xp.cos(xp.pi * progress))
    elif cfg.schedule == "linear":
      decayed = peak + (final - peak) * progress
    else:
      decayed = xp.asarray(peak, xp.float32)
    return xp.where(count < warmup, warm, decayed)

  return schedule


def _leaf_name(path) -> str:
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(names[-1]) if names else ""


def decay_mask(params):
  """True where weight decay applies: every parameter but norm scales and biases (by name, since
  scanned layers stack a norm's scale into a matrix)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) not in NO_DECAY, params)


class GradNormState(NamedTuple):
  grad_norm: jax.Array


def record_grad_norm() -> optax.GradientTransformation:
  """Stores the global norm of the incoming (accumulated, unclipped) gradient for the metrics."""

  def init(params):
    del params
    return GradNormState(jnp.zeros([], jnp.float32))

  def update(updates, state, params=None):
    del state, params
    return updates, GradNormState(optax.tree.norm(updates).astype(jnp.float32))

  return optax.GradientTransformation(init, update)


class _ResettingMultiSteps(optax.MultiSteps):
  """MultiSteps whose accumulator restarts from exact zeros after each update.

  optax resets it by multiplying with 0, which leaves NaN where a skipped non-finite gradient was
  accumulated (every later step would be skipped too), and -0.0 where the sum was negative. In the
  one-program step (`lm.training.train_step.train_step`) the restart is a constant selection of zeros, which XLA
  folds: the multiplication is never computed."""

  def update(self, updates, state, params=None, **extra_args):
    updates, state = super().update(updates, state, params, **extra_args)
    restarted = state.mini_step == 0
    acc_grads = jax.tree.map(lambda a: jnp.where(restarted, jnp.zeros_like(a), a), state.acc_grads)
    return updates, state._replace(acc_grads=acc_grads)

  def gradient_transformation(self) -> optax.GradientTransformation:
    return optax.GradientTransformation(init=self.init, update=self.update)


def make_optimizer(cfg: TrainConfig, num_train_steps: int) -> optax.MultiSteps:
  """The inner chain sees the sum of the micro-batch gradients: MultiSteps sums (use_grad_mean=False)
  and each micro-batch's loss is already divided by the real tokens of the whole optimizer step."""
  lr = learning_rate_schedule(cfg, num_train_steps)
  if cfg.optimizer == "adamw":
    base = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=decay_mask)
  else:
    base = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
  clip = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
  update = optax.chain(*clip, base)
  if cfg.skip_nonfinite_updates:
    # Checks the summed gradient of the whole step, so a skipped step still consumes exactly its own
    # micro-batches (MultiSteps' own skip works per micro-batch and would shift the step boundaries).
    update = optax.apply_if_finite(update, max_consecutive_errors=2**30)
  inner = optax.chain(record_grad_norm(), update)
  return _ResettingMultiSteps(inner, every_k_schedule=cfg.gradient_accumulation_steps, use_grad_mean=False)


def grad_norm(opt_state: optax.MultiStepsState) -> jax.Array:
  """Global gradient norm of the last optimizer update."""
  return opt_state.inner_opt_state[0].grad_norm


def skipped_updates(opt_state: optax.MultiStepsState) -> jax.Array:
  """Optimizer steps skipped so far for a non-finite gradient (0 unless skip_nonfinite_updates)."""
  update_state = opt_state.inner_opt_state[1]
  if isinstance(update_state, optax.ApplyIfFiniteState):
    return update_state.total_notfinite
  return jnp.zeros([], jnp.int32)
