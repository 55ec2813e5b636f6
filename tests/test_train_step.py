"""The train step: token-exact accumulation, masking, learning, and sharded == unsharded."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lm import data, sharding
from lm.model import Decoder
from lm.optimizer import make_optimizer
from lm.train_step import TrainState, accumulate_step, train_step, update_step
from tests.helpers import base_config, mesh_config, tiny_model

L = 16


def _train_cfg(k: int):
  return dataclasses.replace(base_config().train, gradient_accumulation_steps=k, learning_rate=1e-2,
                             warmup_steps=0, num_train_steps=10, seq_len=L)


def _batch(rows: int, seed: int = 0):
  """Rows of several documents each, and some padding, so that micro-batches hold unequal token counts."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 64, (rows, L)).astype(np.int32)
  segments = np.ones((rows, L), np.int32)
  segments[:, 7:] = 2
  segments[0, 4:] = 0  # mostly padding
  segments[-1, 12:] = 0
  positions = np.zeros((rows, L), np.int32)
  for r in range(rows):
    for s in np.unique(segments[r]):
      where = segments[r] == s
      positions[r, where] = np.arange(where.sum())
  return {"tokens": tokens, "segment_ids": segments, "positions": positions}


def _init(model, tx):
  tokens = jnp.zeros((1, L), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tokens, tokens + 1, tokens)["params"])
  return TrainState(params=params, opt_state=tx.init(params))


def loop_steps(model, tx, k):
  """The loop's micro-steps (as lm.train runs them): `step(state, batch, scale, i)` for micro-step i."""
  accumulate = jax.jit(functools.partial(accumulate_step, model=model))
  update = jax.jit(functools.partial(update_step, model=model, tx=tx, accumulation_steps=k))
  return lambda state, batch, scale, i: (update if i == k - 1 else accumulate)(state, batch, scale)


def _run(model, k, batch, steps=1, per_micro_mean=False):
  """`steps` optimizer steps on the same global batch, split into k micro-batches.

  per_micro_mean: the common mistake, each micro-batch's mean loss averaged over micro-batches.
  """
  tx = make_optimizer(_train_cfg(k), 10)
  step = loop_steps(model, tx, k)
  state = _init(model, tx)
  scale = np.float32(1.0 / data.loss_mask(batch["segment_ids"]).sum())
  rows = len(batch["tokens"]) // k
  micro = [{n: v[i * rows:(i + 1) * rows] for n, v in batch.items()} for i in range(k)]
  losses = []
  for _ in range(steps):
    total = 0.0
    for i, m_batch in enumerate(micro):
      if per_micro_mean:
        scale_i = np.float32(1.0 / (k * data.loss_mask(m_batch["segment_ids"]).sum()))
      state, m = step(state, m_batch, scale_i if per_micro_mean else scale, i)
      total += float(m["sequence_loss"].sum())
    losses.append(total * scale)
  return state, losses


def _relative_l2(a, b) -> float:
  """|a - b| / |b| over all parameters as one vector."""
  diff = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return (diff / sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))) ** 0.5


def _grad_norm(state) -> float:
  return float(state.opt_state.inner_opt_state[0].grad_norm)


def test_accumulation_equals_one_large_batch_with_unequal_token_counts():
  model = Decoder(tiny_model())
  batch = _batch(8)
  one, loss_one = _run(model, 1, batch)
  four, loss_four = _run(model, 4, batch)
  assert int(four.step) == int(one.step) == 1
  assert abs(loss_one[0] - loss_four[0]) < 1e-6 * loss_one[0]
  assert abs(_grad_norm(four) - _grad_norm(one)) < 1e-6 * _grad_norm(one)
  # Adam's first step divides by |g|, so a few elements with tiny gradients carry the rounding of the
  # summation order; over all parameters the difference stays under 1e-6.
  assert _relative_l2(four.params, one.params) < 1e-6
  # Averaging per-micro-batch means (what most stacks do) weights the tokens unequally: the checks above
  # tell it apart.
  wrong, _ = _run(model, 4, batch, per_micro_mean=True)
  assert abs(_grad_norm(wrong) - _grad_norm(one)) > 1e-3 * _grad_norm(one)
  assert _relative_l2(wrong.params, one.params) > 1e-5


def test_micro_steps_do_not_update_params_until_the_kth():
  model = Decoder(tiny_model())
  tx = make_optimizer(_train_cfg(3), 10)
  state = _init(model, tx)
  batch = _batch(3)
  step = jax.jit(functools.partial(train_step, model=model, tx=tx))
  params0 = state.params
  for i in range(3):
    state, _ = step(state, {n: v[i:i + 1] for n, v in batch.items()}, np.float32(0.01))
    changed = _relative_l2(state.params, params0) > 0
    assert changed == (i == 2) and int(state.step) == (1 if i == 2 else 0)


def test_loss_falls_on_a_repeated_batch():
  _, losses = _run(Decoder(tiny_model()), 2, _batch(4), steps=10)
  assert losses[-1] < 0.7 * losses[0], losses


def test_masked_tokens_do_not_change_loss_or_update():
  model = Decoder(tiny_model())
  batch = _batch(4)
  changed = {n: v.copy() for n, v in batch.items()}
  changed["tokens"][batch["segment_ids"] == 0] = 5  # padding positions only
  a, loss_a = _run(model, 2, batch)
  b, loss_b = _run(model, 2, changed)
  assert loss_a == loss_b
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_sharded_equals_unsharded():
  cfg = tiny_model()
  model = Decoder(cfg)
  batch = _batch(8)
  plain, plain_loss = _run(model, 2, batch)
  mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
  tx = make_optimizer(_train_cfg(2), 10)
  tokens = jnp.zeros((1, L), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens + 1, tokens)["params"])
  param_sharding = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  state = _init(model, tx)
  state = state.replace(params=jax.device_put(state.params, param_sharding))
  with sharding.activate(mesh):
    step = loop_steps(model, tx, 2)
    scale = np.float32(1.0 / data.loss_mask(batch["segment_ids"]).sum())
    total = 0.0
    for i in range(2):
      micro = sharding.put_batch({n: v[i * 4:(i + 1) * 4] for n, v in batch.items()}, mesh)
      state, m = step(state, micro, scale, i)
      total += float(m["sequence_loss"].sum())
  assert state.params["layers"]["mlp"]["gate_proj"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor")
  assert abs(total * scale - plain_loss[0]) < 1e-6 * plain_loss[0]
  assert _relative_l2(state.params, plain.params) < 1e-6


def _assert_same(a, b):
  """Same values (NaN equal to NaN; -0.0 equal to 0.0) and the same dtype."""
  np.testing.assert_array_equal(a, b)
  assert a.dtype == b.dtype, (a.dtype, b.dtype)


@pytest.mark.parametrize("k,skip_nonfinite", [(3, False), (3, True), (1, False)])
def test_loop_steps_are_bitwise_the_multisteps_micro_steps(k, skip_nonfinite):
  """The loop runs `accumulate_step` for all micro-steps but the last and `update_step` for the last: they
  must leave exactly the state (accumulator, counters, params, optimizer state) and figures that
  MultiSteps' own micro-steps leave, dtypes included (the restarted accumulator may differ in the sign of
  zero: MultiSteps multiplies it by 0)."""
  model = Decoder(tiny_model())
  cfg = dataclasses.replace(_train_cfg(k), skip_nonfinite_updates=skip_nonfinite)
  tx = make_optimizer(cfg, 10)
  full = jax.jit(functools.partial(train_step, model=model, tx=tx))
  fast = loop_steps(model, tx, k)
  batch = _batch(2 * k)
  scale = np.float32(1.0 / data.loss_mask(batch["segment_ids"]).sum())
  micro = [{n: v[i * 2:(i + 1) * 2] for n, v in batch.items()} for i in range(k)]
  reference = state = _init(model, tx)
  for _ in range(2):  # two optimizer steps: the accumulator must restart the same way too
    for i, m_batch in enumerate(micro):
      reference, ref_metrics = full(reference, m_batch, scale)
      state, metrics = fast(state, m_batch, scale, i)
      jax.tree.map(_assert_same, state, reference)
      jax.tree.map(_assert_same, metrics, ref_metrics)
  assert int(state.step) == 2 and _grad_norm(state) > 0
  assert not jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), state.params,
                                       _init(model, tx).params))
