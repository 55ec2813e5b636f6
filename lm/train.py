"""`train_and_evaluate(config, workdir)`: set up or resume, then the loop of optimizer steps.

Batch arithmetic (all per optimizer step):
  micro_batch_size            sequences per device per forward/backward pass
  gradient_accumulation_steps micro-batches each device accumulates (per device, so scaling devices
                              needs no config change)
  global batch                micro_batch_size x gradient_accumulation_steps x data-parallel devices
Each process draws its rows of the global batch of step s (a function of seed and s: one process draws
them all), then feeds them as gradient_accumulation_steps micro-batches, each split over the data-parallel
devices in order: the devices get the same rows whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import signal
import threading
import time
import uuid
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers, periodic_actions
from etils import epath
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import checkpoint, console, data, metrics, sharding
from lm.config import Config, ConfigError, to_dict
from lm.errors import TrainingError
from lm.model import Decoder, param_count
from lm.optimizer import learning_rate_schedule, make_optimizer
from lm.train_step import TrainState, accumulate_step, eval_step, update_step


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

  def describe(self) -> list[tuple[str, str]]:
    return [
        ("Micro batch", f"{self.micro_batch_size} sequences per device"),
        ("Gradient accum steps", f"{self.accumulation_steps} per device | "
                                 f"{self.accumulation_steps * self.data_parallel} global"),
        ("Effective batch", f"{self.micro_batch_size} x {self.accumulation_steps} x {self.data_parallel} = "
                            f"{self.global_sequences:,} sequences = {self.global_sequences * self.seq_len:,} tokens"),
    ]


def absolute(path: str) -> str:
  """Local paths made absolute (orbax requires it); URLs such as gs://bucket/run are kept."""
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def checkpoint_directory(config: Config, workdir: str) -> str:
  """config.train.checkpoint_dir, or <workdir>/checkpoints when it is empty."""
  path = config.train.checkpoint_dir
  return absolute(path) if path else str(epath.Path(absolute(workdir)) / "checkpoints")


def check_writable(path: str, key: str) -> None:
  """Fails at startup, not at the first checkpoint, when a directory cannot be written."""
  try:
    directory = epath.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write_probe_{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # the backends (local, GCS) raise different types
    raise ConfigError(f"{key} = {path!r} cannot be written ({type(e).__name__}: {e}). "
                      "Pass a directory you can write to.") from e


def checkpoint_disk(abstract_state, checkpoint_dir: str, max_to_keep: int) -> str:
  """Disk the kept checkpoints need (one more while a save is written), and a warning if short."""
  size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
  needed = size * (max_to_keep + 1)
  text = f"{max_to_keep} kept + 1 being written x {size / 2**20:,.1f} MiB = {needed / 2**20:,.1f} MiB"
  if "://" in checkpoint_dir:
    return text
  free = shutil.disk_usage(checkpoint_dir).free
  if free < needed:
    console.logger.warning("Only %.1f MiB free under %s, the checkpoints need %.1f MiB: lower "
                           "config.train.max_to_keep or free disk space.", free / 2**20, checkpoint_dir,
                           needed / 2**20)
  return f"{text} ({free / 2**30:,.1f} GiB free)"


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """The jitted functions of a run and the shardings they use; build them inside `sharding.activate`."""
  create_state: Callable  # () -> initial TrainState, created directly in its shardings
  abstract_state: TrainState  # ShapeDtypeStructs with shardings: the restore and AOT-compile target
  state_sharding: TrainState
  batch_sharding: dict[str, jax.sharding.NamedSharding]
  step_fn: Callable  # (state, micro-batch, loss_scale) -> (state, metrics); state donated; the last
  # micro-step of an optimizer step, which runs the optimizer
  accumulate_fn: Callable  # the same for the micro-steps before the last of an optimizer step
  eval_fn: Callable  # (params, batch) -> metrics
  state_from_params: Callable  # params (in state_sharding.params) -> a fresh TrainState at step 0

  def abstract_micro_batch(self, rows: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=s)
            for k, s in self.batch_sharding.items()}


def build_step_functions(config: Config, mesh: jax.sharding.Mesh, num_train_steps: int) -> StepFunctions:
  """Model, optimizer, shardings and the jitted train and eval steps: everything but the data."""
  t = config.train
  model = Decoder(config.model)
  tx = make_optimizer(t, num_train_steps)

  def init(rng):
    # One row per data-parallel device, so that the batch-sharded activation constraints divide.
    dummy_BxL = jnp.zeros((sharding.data_parallel_size(mesh), t.seq_len), jnp.int32)
    params = model.init(rng, dummy_BxL, dummy_BxL + 1, dummy_BxL)["params"]
    return TrainState(params=params, opt_state=tx.init(params))

  rng = jax.random.key(t.seed)
  boxed = jax.eval_shape(init, rng)
  state_sharding = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  create = jax.jit(lambda r: sharding.strip_boxes(init(r)), out_shardings=state_sharding)
  batch_sharding = {k: sharding.batch_sharding(mesh) for k in ("tokens", "segment_ids", "positions")}
  replicated = sharding.replicated(mesh)
  return StepFunctions(
      create_state=lambda: create(rng),
      abstract_state=checkpoint.abstract_like(sharding.strip_boxes(boxed), state_sharding),
      state_sharding=state_sharding,
      batch_sharding=batch_sharding,
      step_fn=jax.jit(functools.partial(update_step, model=model, tx=tx,
                                        accumulation_steps=t.gradient_accumulation_steps),
                      in_shardings=(state_sharding, batch_sharding, replicated),
                      out_shardings=(state_sharding, replicated), donate_argnums=0),
      accumulate_fn=jax.jit(functools.partial(accumulate_step, model=model),
                            in_shardings=(state_sharding, batch_sharding, replicated),
                            out_shardings=(state_sharding, replicated), donate_argnums=0),
      eval_fn=jax.jit(functools.partial(eval_step, model=model),
                      in_shardings=(state_sharding.params, batch_sharding), out_shardings=replicated),
      state_from_params=jax.jit(lambda p: TrainState(params=p, opt_state=tx.init(p)),
                                in_shardings=(state_sharding.params,), out_shardings=state_sharding),
  )


def _sum_losses(micro_metrics: list[dict]) -> tuple[float, int]:
  """Loss sum and token count over micro-batches, added in global row order."""
  fetched = jax.device_get(micro_metrics)
  losses = np.concatenate([m["sequence_loss"] for m in fetched])
  tokens = np.concatenate([m["sequence_tokens"] for m in fetched])
  return math.fsum(losses.astype(np.float64)), int(tokens.sum())


def evaluate(eval_fn, params, batches: list[dict], mesh) -> dict[str, float]:
  """Loss over the fixed validation batches (each process passes only its devices' rows of them)."""
  rows = len(batches[0]["tokens"])
  mine = sharding.process_rows(mesh, rows)
  local = [{k: v[mine] for k, v in b.items()} for b in batches]
  loss_sum, tokens = _sum_losses([eval_fn(params, sharding.put_batch(b, mesh, rows)) for b in local])
  loss = loss_sum / max(tokens, 1)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


class StepTimer:
  """Average wall time per optimizer step between log points, leaving out compilation (the first step
  of the run) and the pauses for eval and checkpoints."""

  def __init__(self):
    self._start, self._step = None, 0

  def step_seconds(self, step: int) -> float | None:
    """Called when `step` has finished; returns the average since the last call, or None."""
    now = time.perf_counter()
    seconds = None if self._start is None else (now - self._start) / max(step - self._step, 1)
    self._start, self._step = now, step
    return seconds

  def pause(self, seconds: float) -> None:
    if self._start is not None:
      self._start += seconds


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything the loop needs, built once by `train_and_evaluate`."""
  config: Config
  workdir: str
  mesh: jax.sharding.Mesh
  plan: BatchPlan
  batches: data.TrainBatches
  eval_batches: list[dict[str, np.ndarray]]
  step_fn: Callable  # (state, micro-batch, loss_scale) -> (state, metrics), jitted, state donated
  accumulate_fn: Callable  # the same for the micro-steps before the last of an optimizer step
  eval_fn: Callable  # (params, batch) -> metrics, jitted
  manager: ocp.CheckpointManager
  lr_schedule: optax.Schedule
  num_train_steps: int
  flops_per_step: float  # model FLOPs of one optimizer step, all micro-batches and devices
  peak_flops_per_device: float

  @property
  def run_description(self) -> dict:
    """Stored beside each checkpoint: the config, and the batch arithmetic that fixes the data order."""
    return {**to_dict(self.config), "global_batch_sequences": self.plan.global_sequences,
            "data_parallel_devices": self.plan.data_parallel}


class MetricsLogger:
  """Writes train and eval figures: CLU writers (TensorBoard + console) and metrics.jsonl, process 0 only."""

  def __init__(self, run: Run, start_step: int):
    is_main = jax.process_index() == 0
    self._run, self._start_step = run, start_step
    # TensorBoard events from process 0; the console line is ours (console.step_line).
    self._writer, self._eval_writer = (
        metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.path.join(run.workdir, name)))
        if is_main else metric_writers.MultiWriter([]) for name in ("train", "eval"))
    self._progress = periodic_actions.ReportProgress(num_train_steps=run.num_train_steps,
                                                     writer=self._writer,
                                                     every_steps=run.config.train.log_interval_steps)
    self._jsonl = metrics.JsonlLog(run.workdir, enabled=is_main)
    self._ema, self.timer = metrics.Ema(), StepTimer()
    self.last: dict[str, float] = {}

  def train_step(self, step: int, micro_metrics: list[dict]) -> None:
    """Host side of a finished optimizer step: fetch its metrics (the step is done) and log them."""
    run, t = self._run, self._run.config.train
    loss_sum, tokens = _sum_losses(micro_metrics)
    last = jax.device_get(micro_metrics[-1])
    scalars = {"loss": loss_sum / max(tokens, 1), "grad_norm": float(last["grad_norm"]),
               "skipped_updates": int(last["skipped_updates"])}
    self._check_finite(step, scalars)
    scalars["loss_ema"] = self._ema.update(scalars["loss"]) if math.isfinite(scalars["loss"]) else math.nan
    self._progress(step, time.time())
    first = step == self._start_step + 1  # carries compilation: timing starts at its end
    if first:
      self.timer.step_seconds(step)
    if step % t.log_interval_steps and step != run.num_train_steps:
      return
    scalars.update(learning_rate=float(run.lr_schedule(step - 1, xp=np)),
                   tokens_seen=step * run.plan.global_sequences * t.seq_len)
    if not first:
      seconds = self.timer.step_seconds(step)
      tokens_per_sec = run.plan.global_sequences * t.seq_len / seconds
      devices = run.mesh.devices.size
      scalars.update(step_time=seconds, tokens_per_sec=tokens_per_sec,
                     tokens_per_sec_per_device=tokens_per_sec / devices,
                     mfu=metrics.mfu(run.flops_per_step, seconds, devices, run.peak_flops_per_device))
    self._writer.write_scalars(step, scalars)
    self._jsonl.write("train", step, scalars)
    self.last.update(scalars)
    seconds = self.last.get("step_time")
    eta = None if seconds is None else seconds * (run.num_train_steps - step)
    console.logger.info("%s", console.step_line(step, run.num_train_steps, scalars, eta))

  def _check_finite(self, step: int, scalars: dict[str, float]) -> None:
    """Stops at a NaN/Inf loss or gradient, unless such updates are skipped (and then counted)."""
    bad = [name for name in ("loss", "grad_norm") if not math.isfinite(scalars[name])]
    if not bad:
      return
    if self._run.config.train.skip_nonfinite_updates:
      console.logger.warning("Step %d: non-finite %s; the update was skipped (%d skipped so far).", step,
                             " and ".join(bad), scalars["skipped_updates"])
      return
    raise TrainingError(
        f"Step {step}: the {' and the '.join(n.replace('_', ' ') for n in bad)} became "
        f"{scalars[bad[0]]} (loss {scalars['loss']}, gradient norm {scalars['grad_norm']}). Nothing of this "
        "step was saved; the newest checkpoint is intact. Lower config.train.learning_rate, keep "
        "config.train.max_grad_norm > 0, or set config.train.skip_nonfinite_updates=True to skip such "
        "updates.")

  def eval(self, step: int, result: dict[str, float]) -> None:
    self._eval_writer.write_scalars(step, result)
    self._jsonl.write("eval", step, result)
    self.last.update(eval_loss=result["loss"], eval_perplexity=result["perplexity"])
    console.logger.info("%s", console.eval_line(step, result["loss"], result["perplexity"], result["tokens"]))

  def close(self) -> None:
    self._writer.flush()
    self._eval_writer.flush()


def split_micro_batches(global_batch: dict[str, np.ndarray], plan: BatchPlan) -> list[dict[str, np.ndarray]]:
  """The global batch (or a process's rows of it, from `step_rows`) as `accumulation_steps` micro-batches
  of consecutive rows, in order.

  Each micro-batch is then split over the data-parallel devices in order (device d of the batch axes
  gets its rows d * micro_batch_size ...), so the global batch is the same bytes whatever the split.
  """
  rows = len(global_batch["tokens"]) // plan.accumulation_steps
  return [{k: v[i * rows:(i + 1) * rows] for k, v in global_batch.items()}
          for i in range(plan.accumulation_steps)]


def step_rows(mesh: jax.sharding.Mesh, plan: BatchPlan) -> np.ndarray:
  """Positions in the global batch of the rows this process's devices get, micro-batch after micro-batch:
  the only rows it reads."""
  in_micro_batch = sharding.process_rows(mesh, plan.micro_rows)
  return (np.arange(plan.accumulation_steps)[:, None] * plan.micro_rows + in_micro_batch).ravel()


def loss_scale_fn(mesh: jax.sharding.Mesh, plan: BatchPlan) -> Callable:
  """(this process's rows of a step) -> 1 / real target tokens of the whole step, a replicated device
  scalar: each process counts its rows, the devices add the counts, no host waits for another's rows."""
  counts_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
  scale = jax.jit(lambda counts: 1.0 / jnp.maximum(jnp.sum(counts), 1).astype(jnp.float32),
                  out_shardings=sharding.replicated(mesh))

  def loss_scale(rows: dict[str, np.ndarray]) -> jax.Array:
    counts = data.loss_mask(rows["segment_ids"]).sum(axis=1, dtype=np.int32)
    counts = counts.reshape(plan.accumulation_steps, -1)  # [micro-batch, row within it]
    return scale(jax.make_array_from_process_local_data(
        counts_sharding, counts, (plan.accumulation_steps, plan.micro_rows)))

  return loss_scale


@contextlib.contextmanager
def process_zero_first():
  """Process 0 runs the block first (it may write caches: the prepared corpus, the tokenizer, packed
  arrays); the others run it once it is done, and find the caches on a shared disk."""
  several = jax.process_count() > 1
  if several and jax.process_index() != 0:
    multihost_utils.sync_global_devices("lm: process 0 prepared the data")
  try:
    yield
  finally:  # also on an error: the others then meet it themselves instead of waiting
    if several and jax.process_index() == 0:
      multihost_utils.sync_global_devices("lm: process 0 prepared the data")


def train_and_evaluate(config: Config, workdir: str, devices=None) -> dict[str, float]:
  """Trains to `num_train_steps` (resuming from the latest checkpoint) and returns the last metrics.

  Args:
    devices: the devices of the mesh; all of them by default.
  """
  t = config.train
  console.setup(is_main=jax.process_index() == 0)
  workdir = absolute(workdir)
  check_writable(workdir, "--workdir")
  checkpoint_dir = checkpoint_directory(config, workdir)
  check_writable(checkpoint_dir, "config.train.checkpoint_dir")

  devices = jax.devices() if devices is None else devices
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_divisible(config.model, dict(mesh.shape))
  plan = BatchPlan(t.micro_batch_size, t.gradient_accumulation_steps,
                   sharding.data_parallel_size(mesh), t.seq_len)

  manager = checkpoint.make_manager(checkpoint_dir, t)
  checkpoint.check_same_step(manager)
  latest_step = checkpoint.check_compatible(manager, to_dict(config))
  if t.init_from and latest_step is None:  # only a fresh start uses it; checked before the data is read
    _, init_model = checkpoint.params_location(t.init_from)
    checkpoint.check_same_model(init_model, to_dict(config)["model"], f"config.train.init_from = {t.init_from!r}")
  with process_zero_first():
    data.check_splits(config.data)
    tokenizer = data.load_tokenizer(config.data, config.model.vocab_size)
    train_data = data.load_split(config.data, tokenizer, t.seq_len, "train")
    eval_data = data.load_split(config.data, tokenizer, t.seq_len, "eval")
  batches = data.TrainBatches(train_data, t.seed, plan.global_sequences)
  eval_batches = data.eval_batches(eval_data, config.data.eval_sequences, plan.micro_rows)
  num_train_steps = t.num_train_steps or t.num_epochs * batches.steps_per_epoch

  flops = metrics.flops_per_token(config.model, t.seq_len)
  peak, peak_source = metrics.peak_flops_per_device(devices[0], t.peak_flops_per_device)

  with sharding.activate(mesh):
    fns = build_step_functions(config, mesh, num_train_steps)
    state, saved = checkpoint.restore_latest(manager, fns.abstract_state)
    resumed = state is not None
    if not resumed:
      state = (fns.state_from_params(checkpoint.restore_params(t.init_from, fns.abstract_state.params))
               if t.init_from else fns.create_state())
    if resumed and saved.get("global_batch_sequences") != plan.global_sequences:
      console.logger.warning(
          "The checkpoint was written with a global batch of %s sequences, this run has %d (per-device "
          "micro batch x accumulation x %d data-parallel devices): the steps from here on see a different "
          "data order than the original run would have.", saved.get("global_batch_sequences"),
          plan.global_sequences, plan.data_parallel)

    console.block([
        ("Model", f"{config.model.name}, {param_count(config.model):,} parameters"),
        ("Devices", f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
                    f"{jax.process_count()} process(es)"),
        ("Mesh", sharding.describe(mesh, config.mesh)),
        *([("Rows per process", f"{len(sharding.process_rows(mesh, plan.micro_rows))} of the "
                                f"{plan.micro_rows} of each micro-batch: each process reads only its own")]
          if jax.process_count() > 1 else []),
        ("Tokenizer", tokenizer.describe()),
        ("Data", f"{len(train_data):,} train sequences of {t.seq_len} tokens "
                 f"({batches.steps_per_epoch:,} steps per epoch), {len(eval_batches)} eval batches"),
        *plan.describe(),
        ("Optimizer", f"{num_train_steps:,} steps, {t.optimizer}, peak learning rate {t.learning_rate:g}"),
        ("FLOPs per token", f"{flops.train:.4g} model FLOPs in training = 3 x {flops.forward:.4g} forward "
                                  f"(attention projections {flops.attention_projections:.4g}, attention "
                                  f"scores {flops.attention_scores:.4g}, mlp {flops.mlp:.4g}, output "
                                  f"{flops.output:.4g})"),
        ("Peak FLOP/s", f"{peak:.4g} per device, for MFU ({peak_source})"),
        ("Checkpoints", f"{checkpoint_dir} (" + (f"resumed from step {int(state.step)}" if resumed
                                                  else "fresh start") + ")"),
        *([("Initialised from", t.init_from if not resumed else f"{t.init_from} (not used: resumed)")]
          if t.init_from else []),
        ("Checkpoint disk", checkpoint_disk(fns.abstract_state, checkpoint_dir, t.max_to_keep)),
    ])

    run = Run(config, workdir, mesh, plan, batches, eval_batches, fns.step_fn, fns.accumulate_fn,
              fns.eval_fn, manager, learning_rate_schedule(t, num_train_steps), num_train_steps,
              flops.train * plan.global_sequences * t.seq_len, peak)
    try:
      return _loop(run, state)
    finally:
      _finish_saves(manager)


class PreemptionNotice:
  """Set by SIGTERM (how Cloud TPU, GKE and SLURM announce a preemption). With several processes JAX's
  preemption sync point handles the signal instead: every process stops at the same step, which a signal
  seen by one host alone could not give. A context manager: the previous SIGTERM handler comes back when
  the loop ends."""

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager, self._signalled, self._previous = manager, False, None

  def __enter__(self) -> PreemptionNotice:
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    return self._manager.reached_preemption(step) or self._signalled


def _save(run: Run, step: int, state: TrainState) -> None:
  try:
    checkpoint.save(run.manager, step, state, run.run_description)
    run.manager.check_for_errors()
  except Exception as e:  # orbax re-raises the writer's own error (OSError, tensorstore, ...)
    raise TrainingError(
        f"Saving the checkpoint of step {step} under {run.manager.directory} failed ({type(e).__name__}: "
        f"{e}). Training stopped rather than go on without checkpoints; the newest complete checkpoint is "
        f"step {run.manager.latest_step()}. Free disk space or fix the permissions of "
        "config.train.checkpoint_dir and run again to resume.") from e


def _finish_saves(manager: ocp.CheckpointManager) -> None:
  """Lets a save in flight complete even when the run stops on an error: its state was good."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # the save's own failure is reported where it surfaced first
    console.logger.warning("A checkpoint save in flight failed too: %s", e)


def _loop(run: Run, state: TrainState) -> dict[str, float]:
  logger = MetricsLogger(run, int(state.step))
  with PreemptionNotice(run.manager) as preemption:
    state = _steps(run, state, logger, preemption)
  run.manager.wait_until_finished()
  run.manager.check_for_errors()
  logger.close()
  return {**logger.last, "step": int(state.step)}


def _steps(run: Run, state: TrainState, logger: MetricsLogger, preemption: PreemptionNotice) -> TrainState:
  """The optimizer steps from the state's to the last (or to a preemption); returns the final state."""
  t, plan = run.config.train, run.plan
  pending = None  # (step, micro-step metrics) not fetched yet
  mine, loss_scale_of = step_rows(run.mesh, plan), loss_scale_fn(run.mesh, plan)
  for step in range(int(state.step), run.num_train_steps):
    batch = run.batches.get(step, mine)  # this process's rows of the step's global batch
    loss_scale = loss_scale_of(batch)
    micro_metrics = []
    for i, micro in enumerate(split_micro_batches(batch, plan)):
      # Only the last micro-step runs the optimizer; the others add their gradient to the accumulator.
      step_fn = run.step_fn if i == plan.accumulation_steps - 1 else run.accumulate_fn
      state, m = step_fn(state, sharding.put_batch(micro, run.mesh, plan.micro_rows), loss_scale)
      micro_metrics.append(m)
    # Fetch the previous step's metrics only now, so that the device already has this step queued.
    if pending is not None:
      logger.train_step(*pending)
    done = step + 1
    pending = (done, micro_metrics)
    preempted = preemption.reached(done)
    evaluate_now = done % t.eval_interval_steps == 0 or done == run.num_train_steps
    save_now = done % t.save_interval_steps == 0 or done == run.num_train_steps or preempted
    if evaluate_now or save_now:
      # This step's figures first: a non-finite step must stop the run before it is saved.
      logger.train_step(*pending)
      pending = None
      # Eval and the checkpoint's copy to host are not training: keep their time out of the step time.
      paused = time.perf_counter()
      if evaluate_now:
        logger.eval(done, evaluate(run.eval_fn, state.params, run.eval_batches, run.mesh))
      if save_now:
        _save(run, done, state)
      logger.timer.pause(time.perf_counter() - paused)
    if preempted:
      run.manager.wait_until_finished()
      console.logger.info("Preempted: finished step %d, saved its checkpoint, exiting. Run the same "
                          "command again to resume.", done)
      break
  if pending is not None:
    logger.train_step(*pending)
  return state
