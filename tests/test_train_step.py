"""The train step: token-exact accumulation, masking, learning, and sharded == unsharded."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from lm.data import batching
from lm.model import sharding
from lm.model.decoder import Decoder
from lm.training.optimizer import grad_norm, make_optimizer, record_grad_norm, skipped_updates
from lm.training.train_step import TrainState, gradient, init_opt_state, token_logprobs, train_step
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


def multisteps_micro_step(state: TrainState, batch, scale, *, model, tx):
  """The specification of `train_step`: one micro-step as `optax.MultiSteps` defines it, the gradient of
  one micro-batch accumulated, and every k-th call the update. `train_step` must leave exactly the state
  and figures that k of these leave."""
  grads, figures = gradient(model, state.params, None, batch, scale)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(params=params, opt_state=opt_state), {
      **figures, "grad_norm": grad_norm(opt_state), "skipped_updates": skipped_updates(opt_state)}


def micro_batches(batch, k):
  """The global batch [k x rows, L] as the train step takes it: [k, rows, L]."""
  return {n: v.reshape(k, -1, *v.shape[1:]) for n, v in batch.items()}


def _run(model, k, batch, steps=1, per_micro_mean=False):
  """`steps` optimizer steps on the same global batch, split into k micro-batches.

  per_micro_mean: the common mistake, each micro-batch's mean loss averaged over micro-batches (through
  the MultiSteps micro-steps, since the one-program step cannot make it).
  """
  tx = make_optimizer(_train_cfg(k), 10)
  state = _init(model, tx)
  scale = np.float32(1.0 / batching.loss_mask(batch["segment_ids"]).sum())
  losses = []
  if per_micro_mean:
    micro_step = jax.jit(functools.partial(multisteps_micro_step, model=model, tx=tx))
    for m_batch in (dict(zip(batch, v)) for v in zip(*micro_batches(batch, k).values())):
      state, _ = micro_step(state, m_batch, np.float32(1.0 / (k * batching.loss_mask(m_batch["segment_ids"]).sum())))
    return state, None
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, accumulation_steps=k))
  for _ in range(steps):
    state, m = step(state, micro_batches(batch, k))
    losses.append(float(m["sequence_loss"].sum()) * scale)
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
  """What the specification (MultiSteps' micro-steps) does, checked, so that comparing with it means
  something."""
  model = Decoder(tiny_model())
  tx = make_optimizer(_train_cfg(3), 10)
  state = _init(model, tx)
  batch = _batch(3)
  step = jax.jit(functools.partial(multisteps_micro_step, model=model, tx=tx))
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
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, accumulation_steps=2))
    scale = np.float32(1.0 / batching.loss_mask(batch["segment_ids"]).sum())
    state, m = step(state, sharding.put_step_batch(micro_batches(batch, 2), mesh))
    total = float(m["sequence_loss"].sum())
  assert state.params["layers"]["mlp"]["gate_proj"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor")
  assert abs(total * scale - plain_loss[0]) < 1e-6 * plain_loss[0]
  assert _relative_l2(state.params, plain.params) < 1e-6


def _assert_same(a, b):
  """Same bits (NaN equal to NaN of the same payload; -0.0 not equal to 0.0) and the same dtype."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype, (a.dtype, b.dtype)
  np.testing.assert_array_equal(a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" else a,
                                b.view(f"u{b.dtype.itemsize}") if b.dtype.kind == "f" else b)


@pytest.mark.parametrize("k,skip_nonfinite", [pytest.param(3, False, marks=pytest.mark.slow), (3, True),
                                             pytest.param(1, False, marks=pytest.mark.slow)])
def test_train_step_is_bitwise_the_multisteps_micro_steps(k, skip_nonfinite):
  """One program per optimizer step must leave exactly the state (accumulator, counters, params,
  optimizer state) and figures that MultiSteps' own k micro-steps leave, dtypes included."""
  model = Decoder(tiny_model())
  cfg = dataclasses.replace(_train_cfg(k), skip_nonfinite_updates=skip_nonfinite)
  tx = make_optimizer(cfg, 10)
  micro_step = jax.jit(functools.partial(multisteps_micro_step, model=model, tx=tx))
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, accumulation_steps=k))
  batch = _batch(2 * k)
  scale = np.float32(1.0 / batching.loss_mask(batch["segment_ids"]).sum())
  micro = micro_batches(batch, k)
  reference = state = _init(model, tx)
  for _ in range(2):  # two optimizer steps: the accumulator must restart the same way too
    figures = []
    for i in range(k):
      reference, ref_metrics = micro_step(reference, {n: v[i] for n, v in micro.items()}, scale)
      figures.append(ref_metrics)
    state, metrics = step(state, micro)
    jax.tree.map(_assert_same, state, reference)
    for name in ("sequence_loss", "sequence_tokens"):
      _assert_same(metrics[name], np.concatenate([f[name] for f in figures]))
    for name in ("grad_norm", "skipped_updates"):
      _assert_same(metrics[name], figures[-1][name])
  assert int(state.step) == 2 and _grad_norm(state) > 0
  assert not jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), state.params,
                                       _init(model, tx).params))


def _record_gradient() -> optax.GradientTransformation:
  """Keeps the gradient the optimizer receives (the sum over micro-batches) in its state, for the probe."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda updates, state, params=None: (updates, updates))


def _sharded_steps(k: int, local_axis, mesh_sizes: dict, steps: int = 3, record: bool = False):
  """`steps` optimizer steps of the one-program step on a mesh, and the compiled program's collectives.
  record: plain SGD whose state is the summed gradient it was given."""
  from lm.tools import hlo
  cfg = tiny_model()
  model = Decoder(cfg)
  tx = make_optimizer(_train_cfg(k), 10)
  if record:
    tx = optax.MultiSteps(optax.chain(record_grad_norm(), _record_gradient(), optax.sgd(1e-2)), k,
                          use_grad_mean=False)
  mesh = sharding.make_mesh(mesh_config(**mesh_sizes))
  tokens = jnp.zeros((1, L), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens + 1, tokens)["params"])
  param_sharding = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  state = _init(model, tx)
  state = state.replace(params=jax.device_put(state.params, param_sharding))
  batch = sharding.put_step_batch(micro_batches(_batch(8 * k), k), mesh)
  with sharding.activate(mesh):
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, accumulation_steps=k,
                                     local_axis=local_axis))
    found = hlo.collectives(step.lower(state, batch).compile().as_text())
    figures = []
    for _ in range(steps):
      state, m = step(state, batch)
      figures.append(jax.device_get(m))
  return state, figures, found


@pytest.mark.parametrize("mesh_sizes", [
    dict(data=8, fsdp=1, tensor=1),
    # Data parallelism beside fsdp or tensor: 30 s each, in `pytest -m slow`.
    pytest.param(dict(data=2, fsdp=4, tensor=1), marks=pytest.mark.slow),
    pytest.param(dict(data=4, fsdp=1, tensor=2), marks=pytest.mark.slow)])
def test_local_accumulation_adds_the_replicas_once_and_agrees_with_all_reduce_per_micro_batch(mesh_sizes):
  """Data-parallel replicas summing their own micro-batches before one all-reduce: the same step, the
  additions in another order. The all-reduce per micro-batch is what XLA compiles otherwise."""
  local, local_figures, local_collectives = _sharded_steps(4, "data", mesh_sizes)
  plain, plain_figures, plain_collectives = _sharded_steps(4, None, mesh_sizes)
  # The first step's losses come before any gradient: bitwise.
  _assert_same(local_figures[0]["sequence_loss"], plain_figures[0]["sequence_loss"])
  # The summed gradient differs by the rounding of the order of its float32 additions (the probe below);
  # through AdamW at lr 1e-2 that grows, as any float32 change of order does (Adam's first steps divide
  # by |g|: elements with tiny gradients move by the full learning rate whatever their rounding): the
  # same bound as accumulation against one large batch.
  assert _relative_l2(local.params, plain.params) < 1e-6
  assert abs(float(local_figures[-1]["grad_norm"]) / float(plain_figures[-1]["grad_norm"]) - 1) < 1e-6
  assert int(local.step) == int(plain.step) == 3
  local_reduce, plain_reduce = local_collectives["all-reduce"], plain_collectives["all-reduce"]
  if mesh_sizes["data"] == 8:
    # The gradient all-reduce of every micro-batch (3 in the scan, 1 after) becomes one, and no longer
    # grows with the accumulation.
    assert local_reduce.bytes < 0.6 * plain_reduce.bytes
    _, _, more = _sharded_steps(8, "data", mesh_sizes, steps=0)
    assert more["all-reduce"] == local_reduce
  else:
    # With fsdp the gradient's reduction over the fsdp axis stays in every micro-batch (XLA:CPU makes it
    # an all-reduce), and tensor parallelism reduces activations in every layer; the reduction over
    # data leaves the loop.
    assert local_reduce.count < plain_reduce.count and local_reduce.bytes <= plain_reduce.bytes


def test_local_accumulation_changes_the_summed_gradient_by_rounding_only():
  """The probe: the gradient the optimizer receives (kept by `_record_gradient`), summed locally then
  across replicas against across replicas then over micro-batches."""
  mesh_sizes = dict(data=8, fsdp=1, tensor=1)
  local, _, _ = _sharded_steps(4, "data", mesh_sizes, steps=1, record=True)
  plain, _, _ = _sharded_steps(4, None, mesh_sizes, steps=1, record=True)
  assert 0 < _relative_l2(local.opt_state.inner_opt_state[1], plain.opt_state.inner_opt_state[1]) < 1e-7


def test_a_batch_of_another_accumulation_is_refused():
  """MultiSteps would never reach its update: the step would silently apply nothing."""
  model = Decoder(tiny_model())
  tx = make_optimizer(_train_cfg(3), 10)
  step = functools.partial(train_step, model=model, tx=tx, accumulation_steps=3)
  with pytest.raises(ValueError, match="holds 2 micro-batches, the optimizer accumulates 3"):
    jax.eval_shape(step, _init(model, tx), micro_batches(_batch(4), 2))


@pytest.mark.parametrize("k", [1, 4])
def test_the_state_carries_no_accumulator_and_steps_the_same(k):
  """The train state's MultiSteps state without acc_grads (`init_opt_state`, as the runtime makes it at
  accumulation 1): the step builds the zeros itself and gives the very parameters and optimizer state of
  the state that carries them; at accumulation 1 it hands back the parameters' bytes less."""
  model = Decoder(tiny_model())
  tx = make_optimizer(_train_cfg(k), 10)
  carried = _init(model, tx)
  lean = carried.replace(opt_state=init_opt_state(tx, carried.params, carry_accumulator=False))
  assert lean.opt_state.acc_grads is None
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, accumulation_steps=k))
  batch = micro_batches(_batch(8), k)
  for _ in range(2):
    carried, carried_figures = step(carried, batch)
    lean, lean_figures = step(lean, batch)
  assert lean.opt_state.acc_grads is None
  jax.tree.map(_assert_same, lean.params, carried.params)
  jax.tree.map(_assert_same, lean.opt_state._replace(acc_grads=None), carried.opt_state._replace(acc_grads=None))
  jax.tree.map(_assert_same, lean_figures, carried_figures)
  if k == 1:  # nothing reads a carried accumulator: jit drops it as an input, and it is handed back
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(carried.params))
    memory = {name: step.lower(state, batch).compile().memory_analysis()
              for name, state in (("carried", carried), ("lean", lean))}
    leaves = len(jax.tree.leaves(carried.params))  # XLA counts 8 bytes per output buffer of the result tuple
    fewer = memory["carried"].output_size_in_bytes - memory["lean"].output_size_in_bytes
    assert fewer == param_bytes + 8 * leaves
    assert memory["carried"].argument_size_in_bytes == memory["lean"].argument_size_in_bytes


def test_the_loss_in_chunks_of_positions_agrees_and_never_holds_the_whole_logits():
  """config.model.logits_chunk: the float32 logits of a few positions at a time (checkpointed, recomputed
  in the backward pass). Per-token log-probabilities and the gradient as computed whole, within float32
  rounding; the compiled gradient's temporaries shrink by most of the [B, L, V] float32 logits."""
  batch = {k: jnp.asarray(v) for k, v in _batch(4).items()}
  results = {}
  for chunk in (0, 4):
    model = Decoder(tiny_model(vocab_size=512, logits_chunk=chunk))
    params = nn.unbox(model.init(jax.random.key(0), batch["tokens"], batch["segment_ids"], batch["positions"])["params"])
    grad = jax.jit(lambda p, m=model: gradient(m, p, None, batch, jnp.float32(0.01)))
    logprobs = jax.jit(lambda p, m=model: token_logprobs(m, p, batch))(params)
    results[chunk] = (np.asarray(logprobs), grad(params)[0], grad.lower(params).compile().memory_analysis())
  whole, chunked = results[0], results[4]
  np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
  assert _relative_l2(chunked[1], whole[1]) < 1e-6
  logits_bytes = 4 * L * 512 * 4  # [B, L, V] float32
  assert whole[2].temp_size_in_bytes - chunked[2].temp_size_in_bytes > 0.5 * logits_bytes
