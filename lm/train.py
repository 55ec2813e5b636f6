"""`train_and_evaluate(config, workdir)`: set up or resume, then the loop of optimizer steps.

Each optimizer step is one program (`lm.train_step.train_step`): this process's rows of the step's global
batch go in (`lm.data` has the batch arithmetic), the new state and the step's figures come out. The
figures of a step are fetched after the next step is dispatched, so that the device never waits on the
host; eval and checkpoints happen between steps.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Callable

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from lm import (checkpoint, console, corpus, data, distributed, errors, evaluate, lease, lora, metrics,
                profiler, runtime, sharding)
from lm.config import Config, ConfigError, profile_step_range, to_dict
from lm.model import param_count
from lm.optimizer import learning_rate_schedule, make_optimizer
from lm.train_step import TrainState
from lm.training import check_finite, check_start, initial_state, throughput


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything the loop needs, built once by `train_and_evaluate` (or by a benchmark on other data)."""
  config: Config
  workdir: str
  rt: runtime.Runtime
  step_fn: Callable  # (state, step batch) -> (state, metrics): jitted or compiled ahead; state donated
  batches: data.TrainBatches
  eval_fn: Callable  # (params, batch) -> metrics
  eval_batches: data.EvalBatches
  manager: ocp.CheckpointManager
  num_train_steps: int
  peak_flops_per_device: float
  tensorboard: bool = True  # False: metrics.jsonl and the console only (no TensorFlow needed)
  progress: dict = dataclasses.field(default_factory=dict)  # the resumed checkpoint's (the loss EMA)
  lease: lease.Lease | None = None  # the workdir's, checked at every step (train_and_evaluate's)

  @property
  def lr_schedule(self) -> optax.Schedule:
    return learning_rate_schedule(self.config.train, self.num_train_steps)

  @property
  def throughput(self) -> metrics.Throughput:
    return throughput(self.rt, self.peak_flops_per_device)

  @property
  def run_description(self) -> dict:
    """Stored beside each checkpoint: the config, and the batch arithmetic that fixes the data order."""
    return {**to_dict(self.config), "global_batch_sequences": self.rt.plan.global_sequences,
            "data_parallel_devices": self.rt.plan.data_parallel}


def train_and_evaluate(config: Config, workdir: str, devices=None) -> dict[str, float]:
  """Trains to `num_train_steps` (resuming from the latest checkpoint) and returns the last metrics.

  Args:
    devices: the devices of the mesh; all of them by default.
  """
  t = config.train
  console.setup(is_main=jax.process_index() == 0)
  workdir = checkpoint.absolute(workdir)
  checkpoint.check_writable(workdir, "--workdir")
  if t.wandb_project and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"config.train.wandb_project = {t.wandb_project!r} needs the wandb package: "
                      "pip install -e '.[wandb]', or leave it empty.")
  with lease.Lease(workdir, enabled=jax.process_index() == 0) as held:  # one training per workdir
    return _train(config, workdir, devices, held)


def _train(config: Config, workdir: str, devices, held: lease.Lease) -> dict[str, float]:
  t = config.train
  checkpoint_dir = checkpoint.checkpoint_directory(config, workdir)
  checkpoint.check_writable(checkpoint_dir, "config.train.checkpoint_dir")
  rt = runtime.setup(config, devices)
  latest_step, saved = check_start(config, checkpoint_dir)
  with distributed.process_zero_first():  # process 0 prepares the data on first use
    tokenizer, prepared = corpus.prepare_all(config.data, config.model.vocab_size)
  batches = corpus.train_batches(prepared, t.seq_len, t.seed, rt.plan.global_sequences)
  eval_batches = corpus.eval_batches(config.data, prepared, t.seq_len, rt.plan.micro_rows)
  manager = checkpoint.make_manager(checkpoint_dir, t)
  num_train_steps = t.num_train_steps or t.num_epochs * batches.steps_per_epoch
  peak, peak_source = metrics.peak_flops_per_device(rt.mesh.devices.flat[0], t.peak_flops_per_device)

  with sharding.activate(rt.mesh):
    fns = runtime.train_functions(rt, make_optimizer(t, num_train_steps))
    state, progress = initial_state(rt, fns, manager, latest_step, t.init_from)
    if latest_step is not None:
      latest_step = int(state.step)  # an older one when the newest could not be restored
    if saved is not None and saved.get("global_batch_sequences") != rt.plan.global_sequences:
      console.logger.warning(
          "The checkpoint was written with a global batch of %s sequences, this run has %d (per-device "
          "micro batch x accumulation x %d data-parallel devices): the steps from here on see a different "
          "data order than the original run would have.", saved.get("global_batch_sequences"),
          rt.plan.global_sequences, rt.plan.data_parallel)
    run = Run(config, workdir, rt, fns.step_fn, batches, runtime.eval_function(rt), eval_batches, manager,
              num_train_steps, peak, progress=progress, lease=held)
    console.block([
        *_startup_lines(run, tokenizer, prepared),
        ("Peak FLOP/s", f"{peak:.4g} per device, for MFU ({peak_source})"),
        ("Checkpoints", f"{checkpoint_dir} (" + (f"resumed from step {latest_step}" if latest_step is not None
                                                  else "fresh start") + ")"),
        *([("Initialised from", t.init_from if latest_step is None else f"{t.init_from} (not used: resumed)")]
          if t.init_from else []),
        ("Checkpoint disk", checkpoint.checkpoint_disk(fns.abstract_state.saved(), checkpoint_dir, t.max_to_keep)),
    ])
    try:
      return loop(run, state)
    finally:
      checkpoint.finish_saves(manager)


def _startup_lines(run: Run, tokenizer, prepared: dict) -> list[tuple[str, str]]:
  """The start-up block's lines about the model, the devices, the data and the batch."""
  config, rt, t = run.config, run.rt, run.config.train
  device = rt.mesh.devices.flat[0]
  flops = metrics.flops_per_token(config.model, t.seq_len)
  several = jax.process_count() > 1
  return [
      ("Model", f"{config.model.name}, {param_count(config.model):,} parameters"),
      *([("LoRA", _lora_line(config, rt))] if config.model.lora_rank else []),
      ("Devices", f"{rt.mesh.devices.size} x {device.device_kind} ({device.platform}), "
                  f"{jax.process_count()} process(es)"),
      ("Mesh", sharding.describe(rt.mesh, config.mesh)),
      *([("Rows per process", f"{len(sharding.process_rows(rt.mesh, rt.plan.micro_rows))} of the "
                              f"{rt.plan.micro_rows} of each micro-batch: each process reads only its own")]
        if several else []),
      ("Tokenizer", tokenizer.describe()),
      *[(f"Source {name}", p.describe()) for name, p in prepared.items()],
      ("Train rows", f"{run.batches.describe()} of {t.seq_len} tokens "
                     f"({run.batches.steps_per_epoch:,} steps per epoch)"),
      ("Eval rows", corpus.describe_eval(config.data, run.eval_batches)),
      *rt.plan.describe(),
      ("Gradient sum", _gradient_sum(rt)),
      ("Optimizer", f"{run.num_train_steps:,} steps, {t.optimizer}, peak learning rate {t.learning_rate:g}"),
      ("FLOPs per token", f"{flops.train:.4g} model FLOPs in training = "
                          + ("3 x " if not flops.frozen else "(LoRA: frozen weights 2x, adapters and scores 3x) ")
                          + f"{flops.forward:.4g} forward "
                          f"(attention projections {flops.attention_projections:.4g}, attention "
                          f"scores {flops.attention_scores:.4g}, mlp {flops.mlp:.4g}, output "
                          f"{flops.output:.4g}" + (f", adapters {flops.adapters:.4g}" if flops.adapters else "") + ")"),
  ]


def _lora_line(config: Config, rt: runtime.Runtime) -> str:
  m = config.model
  adapters = lora.count(sharding.strip_boxes(rt.boxed_params))
  return (f"rank {m.lora_rank}, alpha {m.lora_alpha:g} on {m.lora_targets}: {adapters:,} adapter parameters "
          f"trained ({adapters / param_count(m):.3%} of the model), the base frozen "
          f"({config.train.init_from or 'the seed initialisation: no config.train.init_from'})")


def _gradient_sum(rt: runtime.Runtime) -> str:
  """How the micro-batches' gradients are added up across the data-parallel devices."""
  shape, t = rt.mesh.shape, rt.config.train
  if rt.plan.data_parallel == 1:
    return "one data-parallel device: no reduction across devices"
  if rt.plan.accumulation_steps == 1:
    return "one micro-batch: one reduction across the devices per optimizer step"
  fsdp = " (over fsdp: in every micro-batch)" if shape["fsdp"] > 1 else ""
  if runtime.local_accumulation(rt):
    return f"each data replica sums its micro-batches, then one all-reduce per optimizer step{fsdp}"
  if t.local_accumulation and shape["data"] > 1:
    console.logger.warning("config.train.local_accumulation does not apply on a mesh with data, fsdp and "
                           "tensor all > 1 (XLA's SPMD partitioner aborts on it): the gradient is reduced in "
                           "every micro-batch. Set one of config.mesh.fsdp or config.mesh.tensor to 1 for it.")
  return "reduced across the devices in every micro-batch"


def loop(run: Run, state: TrainState) -> dict[str, float]:
  """The optimizer steps from the state's to the last (or to a preemption); returns the last figures."""
  t = run.config.train
  if run.lease is not None:
    run.lease.confirm()  # before anything of this run is written
  logger = metrics.MetricsLogger(run.workdir, num_train_steps=run.num_train_steps,
                                 log_interval_steps=t.log_interval_steps, throughput=run.throughput,
                                 start_step=int(state.step), wandb_project=t.wandb_project,
                                 run_config=run.run_description, tensorboard=run.tensorboard,
                                 progress=run.progress)
  profiled = profiler.steps_to_trace(profile_step_range(t.profile_steps), int(state.step), run.num_train_steps)
  try:
    with (checkpoint.PreemptionNotice(run.manager) as preemption,
          profiler.StepProfile(profiled, run.workdir, pause=logger.timer.pause) as profile):
      state = _steps(run, state, logger, preemption, profile)
    checkpoint.seal(run.manager)
    run.manager.check_for_errors()
    if preemption.interrupted:
      raise errors.Interrupted(f"Interrupted (Ctrl-C): finished step {int(state.step)} and saved it. Run the "
                               "same command again to resume.")
  finally:  # also on an error: the writers' buffered figures and the wandb run are closed
    logger.close()
  return {**logger.last, "step": int(state.step)}


def _steps(run: Run, state: TrainState, logger: metrics.MetricsLogger,
           preemption: checkpoint.PreemptionNotice, profile: profiler.StepProfile) -> TrainState:
  t, rt = run.config.train, run.rt
  mine = data.step_rows(rt.mesh, rt.plan)  # this process's rows of every step's global batch
  pending = None  # (step, figures on the device) not fetched yet
  for step in range(int(state.step), run.num_train_steps):
    done = step + 1  # the step's number in the log, in TensorBoard and of its checkpoint
    if run.lease is not None:
      run.lease.check()
    profile.before(done)
    rows = data.micro_batches(run.batches.get(step, mine), rt.plan)
    state, figures = run.step_fn(state, sharding.put_step_batch(rows, rt.mesh, rt.plan.micro_rows))
    profile.after(done, (state, figures))
    # Fetch the previous step's figures only now, so that the device already has this step queued.
    if pending is not None:
      _record(run, logger, *pending)
    pending = (done, figures)
    preempted = preemption.reached(done)
    evaluate_now = done % t.eval_interval_steps == 0 or done == run.num_train_steps
    save_now = done % t.save_interval_steps == 0 or done == run.num_train_steps or preempted
    if evaluate_now or save_now:
      # This step's figures first: a non-finite step must stop the run before it is saved.
      _record(run, logger, *pending)
      pending = None
      # Eval and the checkpoint's copy to host are not training: keep their time out of the step time.
      paused = time.perf_counter()
      if evaluate_now:
        logger.eval(done, evaluate.evaluate(run.eval_fn, state.model_params, run.eval_batches, rt.mesh))
      if save_now:
        checkpoint.save(run.manager, done, state.saved(), run.run_description, logger.progress())
      logger.timer.pause(time.perf_counter() - paused)
    if preempted:
      checkpoint.seal(run.manager)
      if not preemption.interrupted:
        console.logger.info("Preempted: finished step %d, saved its checkpoint, exiting. Run the same "
                            "command again to resume.", done)
      break
  if pending is not None:
    _record(run, logger, *pending)
  return state


def _record(run: Run, logger: metrics.MetricsLogger, step: int, figures: dict) -> None:
  """Host side of a finished optimizer step: fetch its figures (the step is done), check them, log them."""
  fetched = jax.device_get(figures)
  loss_sum, tokens = metrics.sum_losses(fetched)
  scalars = {"loss": loss_sum / max(tokens, 1), "grad_norm": float(fetched["grad_norm"]),
             "skipped_updates": int(fetched["skipped_updates"])}
  check_finite(run.config.train.skip_nonfinite_updates, step, scalars)
  scalars["learning_rate"] = float(run.lr_schedule(step - 1, xp=np))
  logger.train_step(step, scalars)


