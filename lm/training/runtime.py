"""The set-up every command shares: mesh, batch plan, model, parameter shardings, abstract parameters;
and the jitted programs built on it (the train step with its optimizer, the eval step).

Training, eval, sampling, the planner and the benchmark all start from `setup(config)`; only training
adds an optimizer (`train_functions`). Trace and call the programs inside `sharding.activate(rt.mesh)`:
the model's activation constraints resolve against its mesh and rules.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from lm.checkpoints import checkpoint, param_files
from lm.config import Config, ModelConfig
from lm.data import batching
from lm.errors import ConfigError
from lm.model import attention, lora, sharding
from lm.model.decoder import Decoder, param_count
from lm.training.train_step import TrainState, in_groups, init_opt_state, token_losses, train_step


@dataclasses.dataclass(frozen=True)
class Runtime:
  """What a config becomes on a set of devices, before any array is allocated."""
  config: Config
  mesh: jax.sharding.Mesh
  plan: batching.BatchPlan
  model: Decoder
  boxed_params: Any  # ShapeDtypeStructs in flax's logical-partitioning boxes: the logical axis names
  param_sharding: Any  # NamedShardings of the parameters
  abstract_params: Any  # ShapeDtypeStructs with shardings: the restore and AOT-compile target

  @property
  def rng(self) -> jax.Array:
    return jax.random.key(self.config.train.seed)

  def init_params(self, rng: jax.Array):
    """The model's initial parameters, boxed with their logical axis names (trace under jit or
    eval_shape)."""
    # One row per data-parallel device, so that the batch-sharded activation constraints divide.
    dummy_BxL = jnp.zeros((self.plan.data_parallel, self.plan.seq_len), jnp.int32)
    return self.model.init(rng, dummy_BxL, dummy_BxL + 1, dummy_BxL)["params"]

  def abstract_step_batch(self, masked: bool | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of one optimizer step as the train step takes it, [k, rows, seq_len]: with a chat
    source (SFT; or `masked`), its loss mask too."""
    shape = (self.plan.accumulation_steps, self.plan.micro_rows, self.plan.seq_len)
    placed = sharding.step_batch_sharding(self.mesh)
    if masked is None:
      masked = any(s.kind == "chat" and s.weight > 0 for s in self.config.data.sources)
    return {k: jax.ShapeDtypeStruct(shape, jnp.bool_ if k == batching.MASK else jnp.int32, sharding=placed)
            for k in batching.ARRAYS + ((batching.MASK,) if masked else ())}


def setup(config: Config, devices=None) -> Runtime:
  """Mesh over `devices` (all by default), checked against the model; the attention for its platform; the
  batch plan; the model and its parameters' shapes and shardings (nothing allocated)."""
  t = config.train
  mesh = sharding.make_mesh(config.mesh, jax.devices() if devices is None else devices)
  sharding.check_divisible(config.model, dict(mesh.shape))
  # "auto" attention for the mesh's devices, which need not be the default backend's (a TPU plan on CPU).
  chosen = attention.resolve(config.model, t.seq_len, mesh.devices.flat[0].platform)
  config = dataclasses.replace(config, model=dataclasses.replace(config.model, attention=chosen))
  plan = batching.batch_plan(t.micro_batch_size, t.gradient_accumulation_steps, t.seq_len, mesh)
  rt = Runtime(config, mesh, plan, Decoder(config.model), None, None, None)
  rng = rt.rng  # made outside the mesh: on compile-only devices (a TPU plan on CPU) nothing can run
  with sharding.activate(mesh):
    boxed = jax.eval_shape(rt.init_params, rng)
  param_sharding = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  return dataclasses.replace(rt, boxed_params=boxed, param_sharding=param_sharding,
                             abstract_params=checkpoint.abstract_like(sharding.strip_boxes(boxed),
                                                                      param_sharding))


def describe(rt: Runtime) -> list[tuple[str, str]]:
  """The start-up block's lines every entry point begins with: the model (its LoRA), the devices, the mesh
  and, with several processes, the rows each reads."""
  config, device = rt.config, rt.mesh.devices.flat[0]
  m = config.model
  lines = [("Model", f"{m.name}, {param_count(m):,} parameters")]
  if m.lora_rank:
    adapters = lora.count(sharding.strip_boxes(rt.boxed_params))
    lines.append(("LoRA", f"rank {m.lora_rank}, alpha {m.lora_alpha:g} on {m.lora_targets}: {adapters:,} adapter "
                          f"parameters trained ({adapters / param_count(m):.3%} of the model), the base frozen "
                          f"({config.train.init_from or 'the seed initialisation: no config.train.init_from'})"))
  lines += [("Devices", f"{rt.mesh.devices.size} x {device.device_kind} ({device.platform}), "
                        f"{jax.process_count()} process(es)"),
            ("Mesh", sharding.describe(rt.mesh, config.mesh))]
  if jax.process_count() > 1:
    lines.append(("Rows per process", f"{len(sharding.process_rows(rt.mesh, rt.plan.micro_rows))} of the "
                                      f"{rt.plan.micro_rows} of each micro-batch: each process reads only its own"))
  return lines


def eval_function(rt: Runtime) -> Callable:
  """(params, batch [rows, seq_len]) -> per-sequence loss sums and token counts, jitted; with
  config.train.batch_invariant each device's rows in groups of its rows per group, so that a row's loss
  does not depend on the batch size either."""
  rows = invariant_rows(rt)
  losses = in_groups(token_losses, rows * rt.plan.data_parallel) if rows else token_losses
  return jax.jit(functools.partial(losses, rt.model),
                 in_shardings=(rt.param_sharding, sharding.batch_sharding(rt.mesh)),
                 out_shardings=sharding.replicated(rt.mesh))


def local_accumulation(rt: Runtime) -> bool:
  """Whether data-parallel replicas sum their micro-batches' gradients locally and add them up once per
  optimizer step (config.train.local_accumulation, with more than one replica and more than one
  micro-batch).

  Not on a mesh split three ways (data, fsdp and tensor all > 1): XLA's SPMD partitioner (jax 0.12)
  aborts on the shard_map manual over data there, so such a step all-reduces per micro-batch."""
  shape = rt.mesh.shape
  return (rt.config.train.local_accumulation and shape["data"] > 1 and rt.plan.accumulation_steps > 1
          and (shape["fsdp"] == 1 or shape["tensor"] == 1))


def invariant_rows(rt: Runtime) -> int:
  """Rows per gradient group of the batch-invariant sum (config.train.batch_invariant), 0 when off; a
  ConfigError at startup where the mode cannot hold."""
  t, shape = rt.config.train, rt.mesh.shape
  if not t.batch_invariant:
    return 0
  if not t.deterministic:
    raise ConfigError("config.train.batch_invariant needs config.train.deterministic = True (on GPUs "
                      "the embedding gradient's scatter adds in a varying order without it). Set "
                      "--config.train.deterministic=True, or turn the mode off.")
  if shape["fsdp"] > 1 or shape["tensor"] > 1:
    raise ConfigError(
        f"config.train.batch_invariant needs a data-parallel mesh, but mesh.fsdp = {shape['fsdp']} and "
        f"mesh.tensor = {shape['tensor']}: the compiler would reduce the gradient over those axes in an order "
        f"of its own. Set --config.mesh.data=-1 --config.mesh.fsdp=1 --config.mesh.tensor=1, or turn the "
        f"mode off.")
  rows = t.batch_invariant_rows
  if rows < 1 or t.micro_batch_size % rows:
    raise ConfigError(
        f"config.train.batch_invariant_rows = {rows} must be a positive divisor of config.train."
        f"micro_batch_size = {t.micro_batch_size}: give it a common divisor of the micro_batch_size of "
        f"every run compared (1 divides every split).")
  return rows


@dataclasses.dataclass(frozen=True)
class TrainFunctions:
  """The jitted programs of training and the state's shardings."""
  create_state: Callable  # () -> initial TrainState, created directly in its shardings
  abstract_state: TrainState  # ShapeDtypeStructs with shardings: the AOT-compile target
  state_sharding: TrainState
  step_fn: Callable  # (state, step batch) -> (state, metrics): one optimizer step; state donated
  # (parameters without adapters, in their shardings) -> a fresh TrainState at step 0 around them
  state_from_params: Callable

  @property
  def lora(self) -> bool:
    return self.abstract_state.frozen is not None

  @property
  def abstract_base(self):
    """The parameters without adapters (what init_from and convert_hf hold): the restore target."""
    return self.abstract_state.frozen if self.lora else self.abstract_state.params


def trainable(params, cfg: ModelConfig):
  """(what the optimizer trains, what stays frozen or None): with LoRA the adapters and the base."""
  if not cfg.lora_rank:
    return params, None
  base, adapters = lora.split(params)
  return adapters, base


def base_params(rt: Runtime):
  """The weights LoRA adapts, in their shardings: config.train.init_from's, else the seed's initialisation
  (what a LoRA run trained on: its checkpoints hold the adapters alone)."""
  cfg, init_from = rt.config.model, rt.config.train.init_from
  if init_from:
    return param_files.restore_params(init_from, trainable(rt.abstract_params, cfg)[1])
  init = jax.jit(lambda rng: trainable(sharding.strip_boxes(rt.init_params(rng)), cfg)[1],
                 out_shardings=trainable(rt.param_sharding, cfg)[1])
  return init(rt.rng)


def train_functions(rt: Runtime, tx: optax.MultiSteps, losses: Callable = token_losses) -> TrainFunctions:
  """The train state's shardings (the optimizer state follows its parameters') and the programs; `losses`
  is the step's loss (`lm.training.train_step.train_step`): the language model's, or GRPO's."""
  cfg = rt.config.model
  params, frozen = trainable(rt.boxed_params, cfg)
  rows = invariant_rows(rt)
  local_axis = "data" if local_accumulation(rt) or (rows and rt.mesh.shape["data"] > 1) else None
  # The accumulator as state only where the step scans micro-batches into it (`init_opt_state`).
  carry = rt.plan.accumulation_steps > 1 and not local_axis and not rows
  opt_init = functools.partial(init_opt_state, tx, carry_accumulator=carry)
  boxed_state = TrainState(params=params, opt_state=jax.eval_shape(opt_init, params), frozen=frozen)
  state_sharding = sharding.logical_to_sharding(nn.get_partition_spec(boxed_state), rt.mesh)

  def init(rng):
    params, frozen = trainable(rt.init_params(rng), cfg)
    return sharding.strip_boxes(TrainState(params=params, opt_state=opt_init(params), frozen=frozen))

  def around(base, rng):
    if frozen is None:
      return TrainState(params=base, opt_state=opt_init(base))
    adapters = sharding.strip_boxes(trainable(rt.init_params(rng), cfg)[0])  # the seed's, as in init
    return TrainState(params=adapters, opt_state=opt_init(adapters), frozen=base)

  create = jax.jit(init, out_shardings=state_sharding)
  base_sharding = state_sharding.params if frozen is None else state_sharding.frozen
  from_params = jax.jit(around, in_shardings=(base_sharding, None), out_shardings=state_sharding)
  replicated = sharding.replicated(rt.mesh)
  return TrainFunctions(
      create_state=lambda: create(rt.rng),
      abstract_state=checkpoint.abstract_like(sharding.strip_boxes(boxed_state), state_sharding),
      state_sharding=state_sharding,
      step_fn=jax.jit(functools.partial(train_step, model=rt.model, tx=tx,
                                        accumulation_steps=rt.plan.accumulation_steps, local_axis=local_axis,
                                        losses=losses, invariant_rows=rows),
                      in_shardings=(state_sharding, sharding.step_batch_sharding(rt.mesh)),
                      out_shardings=(state_sharding, replicated), donate_argnums=0),
      state_from_params=lambda base: from_params(base, rt.rng),
  )
