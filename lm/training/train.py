"""`train_and_evaluate(config, workdir)`: set up or resume, then the loop of optimizer steps, for every kind
of training.

A kind of training supplies only what differs (`Kind`): its batches, its loss over a micro-batch, its eval
and its extra figures. `lm.training.next_token` is pre-training on documents and supervised fine-tuning on
conversations; `lm.training.grpo` is GRPO (config.grpo.enabled). Everything else is this module's, the same for
every kind: the set-up or the resume, the checks of a resumed run, one program per optimizer step
(`lm.training.train_step.train_step` with the kind's loss), the figures of a step fetched after the next one is
dispatched (the device never waits on the host), eval and checkpoints between steps, preemption and
Ctrl-C, the profiler, the workdir's lease and the metric writers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from typing import Callable, Protocol

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from lm import console, errors, storage
from lm.checkpoints import checkpoint, disk, lease, param_files, resume
from lm.checkpoints.preemption import PreemptionNotice
from lm.config import Config, profile_step_range, to_dict
from lm.errors import ConfigError, TrainingError
from lm.model import sharding
from lm.training import flop_count, metrics, next_token, profiler, runtime
from lm.training.optimizer import learning_rate_schedule, make_optimizer
from lm.training.train_step import TrainState


class Kind(Protocol):
  """What a kind of training supplies to the loop (`lm.training.next_token.NextToken`, `lm.training.grpo.GRPO`)."""
  losses: Callable  # (model, params, micro-batch) -> per-sequence "sequence_loss", "sequence_tokens", ...
  steps_per_epoch: int | None  # None: no epochs (config.train.num_train_steps counts the steps)
  evaluate_first: bool  # eval the starting model before the first step of a fresh run
  on_policy: bool  # its batch is sampled from the state (GRPO): the previous step is checked before it

  def describe(self) -> list[tuple[str, str]]: ...  # its lines of the start-up block

  def start(self, fns: runtime.TrainFunctions, state: TrainState, resumed: bool) -> None: ...

  # (this process's rows of the step's global batch [micro-batch, row, ...], host figures of the step)
  def batch(self, step: int, state: TrainState) -> tuple[dict[str, np.ndarray], dict[str, float]]: ...

  def figures(self, fetched: dict, tokens: int) -> dict[str, float]: ...  # from the step's fetched figures

  def evaluate(self, state: TrainState) -> dict[str, float]: ...


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything the loop needs, built once by `train_and_evaluate` (or by a benchmark on other data)."""
  config: Config
  workdir: str
  rt: runtime.Runtime
  step_fn: Callable  # (state, step batch) -> (state, metrics): jitted or compiled ahead; state donated
  kind: Kind
  checkpoints: checkpoint.Checkpoints  # the run's writing side of its checkpoint directory
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
    """What an optimizer step does, for tokens/s and MFU: its tokens and model FLOPs on the mesh's devices."""
    plan = self.rt.plan
    flops = flop_count.flops_per_token(self.config.model, plan.seq_len).train * plan.tokens_per_step
    return metrics.Throughput(plan.tokens_per_step, flops, self.rt.mesh.devices.size, self.peak_flops_per_device)

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
  workdir = storage.absolute(workdir)
  disk.check_writable(workdir, "--workdir")
  if t.wandb_project and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"config.train.wandb_project = {t.wandb_project!r} needs the wandb package: "
                      "pip install -e '.[wandb]', or leave it empty.")
  with lease.Lease(workdir, enabled=jax.process_index() == 0) as held:  # one training per workdir
    return _train(config, workdir, devices, held)


def make_kind(rt: runtime.Runtime) -> Kind:
  """The config's kind of training: GRPO with config.grpo.enabled, else next-token training on its corpus."""
  if rt.config.grpo.enabled:
    from lm.training import grpo  # here: its sampler and rewards only for a GRPO run
    return grpo.make(rt)
  return next_token.make(rt)


def _train(config: Config, workdir: str, devices, held: lease.Lease) -> dict[str, float]:
  t = config.train
  checkpoint_dir = disk.checkpoint_directory(config, workdir)
  disk.check_writable(checkpoint_dir, "config.train.checkpoint_dir")
  rt = runtime.setup(config, devices)
  latest_step, saved = resume.check_start(config, checkpoint_dir)
  kind = make_kind(rt)
  checkpoints = checkpoint.Checkpoints(checkpoint_dir, t)  # the writing side, once the data is known good
  num_train_steps = t.num_train_steps or t.num_epochs * kind.steps_per_epoch
  peak, peak_source = flop_count.peak_flops_per_device(rt.mesh.devices.flat[0], t.peak_flops_per_device)
  with sharding.activate(rt.mesh):
    fns = runtime.train_functions(rt, make_optimizer(t, num_train_steps), losses=kind.losses)
    state, progress = initial_state(rt, fns, checkpoints.manager, latest_step, t.init_from)
    if latest_step is not None:
      latest_step = int(state.step)  # an older one when the newest could not be restored
    kind.start(fns, state, resumed=latest_step is not None)  # may trace the model: under the mesh's rules
  # Checkpoints from before the batch was saved with them (GRPO's) say nothing of it.
  saved_batch = (saved or {}).get("global_batch_sequences", rt.plan.global_sequences)
  if saved_batch != rt.plan.global_sequences:
    console.logger.warning(
        "The checkpoint was written with a global batch of %s sequences, this run has %d (per-device "
        "micro batch x accumulation x %d data-parallel devices): the steps from here on see a different "
        "data order than the original run would have.", saved_batch,
        rt.plan.global_sequences, rt.plan.data_parallel)
  run = Run(config, workdir, rt, fns.step_fn, kind, checkpoints, num_train_steps, peak, progress=progress,
            lease=held)
  console.block([
      *_startup_lines(run),
      ("Peak FLOP/s", f"{peak:.4g} per device, for MFU ({peak_source})"),
      ("Checkpoints", f"{checkpoint_dir} (" + (f"resumed from step {latest_step}" if latest_step is not None
                                                else "fresh start") + ")"),
      *([("Initialised from", t.init_from if latest_step is None else f"{t.init_from} (not used: resumed)")]
        if t.init_from else []),
      ("Checkpoint disk", disk.checkpoint_disk(fns.abstract_state.saved(), checkpoint_dir, t.max_to_keep)),
  ])
  try:
    return loop(run, state)
  finally:
    checkpoints.finish()


def _startup_lines(run: Run) -> list[tuple[str, str]]:
  """The start-up block's lines about the model, the devices, the kind of training and the batch."""
  config, rt, t = run.config, run.rt, run.config.train
  flops = flop_count.flops_per_token(config.model, t.seq_len)
  return [
      *runtime.describe(rt),
      *run.kind.describe(),
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


def _gradient_sum(rt: runtime.Runtime) -> str:
  """How the micro-batches' gradients are added up across the data-parallel devices."""
  shape, t = rt.mesh.shape, rt.config.train
  if rows := runtime.invariant_rows(rt):
    return (f"batch-invariant: the gradients of groups of {rows} row(s) added in global row order"
            + (f", across the {shape['data']} devices in device order (an all-to-all per group step)"
               if shape["data"] > 1 else "") + ": the same bits on every split of the global batch")
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
    with (PreemptionNotice(run.checkpoints.manager) as preemption,
          profiler.StepProfile(profiled, run.workdir, pause=logger.timer.pause) as profile):
      if run.kind.evaluate_first and int(state.step) == 0:
        logger.eval(0, run.kind.evaluate(state))
      state = _steps(run, state, logger, preemption, profile)
    run.checkpoints.seal()
    if preemption.interrupted:
      raise errors.Interrupted(f"Interrupted (Ctrl-C): finished step {int(state.step)} and saved it. Run the "
                               "same command again to resume.")
  finally:  # also on an error: the writers' buffered figures and the wandb run are closed
    logger.close()
  return {**logger.last, "step": int(state.step)}


def _steps(run: Run, state: TrainState, logger: metrics.MetricsLogger,
           preemption: PreemptionNotice, profile: profiler.StepProfile) -> TrainState:
  t, rt = run.config.train, run.rt
  pending = None  # (step, figures on the device, the kind's host figures) not recorded yet
  for step in range(int(state.step), run.num_train_steps):
    done = step + 1  # the step's number in the log, in TensorBoard and of its checkpoint
    if run.lease is not None:
      run.lease.check()
    profile.before(done)
    if run.kind.on_policy and pending is not None:  # no sampling from a step that is not known good
      _record(run, logger, *pending)
      pending = None
    rows, host_figures = run.kind.batch(step, state)
    with sharding.activate(rt.mesh):  # a jitted step traces its model under the mesh's rules
      state, figures = run.step_fn(state, sharding.put_step_batch(rows, rt.mesh, rt.plan.micro_rows))
    profile.after(done, (state, figures))
    # Fetch the previous step's figures only now, so that the device already has this step queued.
    if pending is not None:
      _record(run, logger, *pending)
    pending = (done, figures, host_figures)
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
        logger.eval(done, run.kind.evaluate(state))
      if save_now:
        run.checkpoints.save(done, state.saved(), run.run_description, logger.progress())
      logger.timer.pause(time.perf_counter() - paused)
    if preempted:
      run.checkpoints.seal()
      if not preemption.interrupted:
        console.logger.info("Preempted: finished step %d, saved its checkpoint, exiting. Run the same "
                            "command again to resume.", done)
      break
  if pending is not None:
    _record(run, logger, *pending)
  return state


def _record(run: Run, logger: metrics.MetricsLogger, step: int, figures: dict, host_figures: dict) -> None:
  """Host side of a finished optimizer step: fetch its figures (the step is done), check them, log them."""
  fetched = jax.device_get(figures)
  loss_sum, tokens = metrics.sum_losses(fetched)
  scalars = {"loss": loss_sum / max(tokens, 1), "grad_norm": float(fetched["grad_norm"]),
             "skipped_updates": int(fetched["skipped_updates"])}
  check_finite(run.config.train.skip_nonfinite_updates, step, scalars)
  scalars["learning_rate"] = float(run.lr_schedule(step - 1, xp=np))
  logger.train_step(step, {**scalars, **run.kind.figures(fetched, tokens), **host_figures})


# ---------------------------------------------------------------------------------------------------
# The start of a run, and the stop at a non-finite step


def initial_state(rt: runtime.Runtime, fns: runtime.TrainFunctions, manager: ocp.CheckpointManager,
                   latest_step: int | None, init_from: str) -> tuple[TrainState, dict]:
  """(state, progress): the newest checkpoint that restores (an unreadable newer one is skipped with a
  warning); else parameters from `init_from` with a fresh optimizer; else new."""
  if latest_step is not None:
    _, saved, progress = checkpoint.restore_newest(manager, latest_step, fns.abstract_state.saved())
    # LoRA: the checkpoint holds the adapters; the base they adapt is init_from's (or the seed's) again.
    return TrainState(**saved, frozen=runtime.base_params(rt) if fns.lora else None), progress
  if init_from:
    return fns.state_from_params(param_files.restore_params(init_from, fns.abstract_base)), {}
  return fns.create_state(), {}


def check_finite(skip_nonfinite_updates: bool, step: int, scalars: dict[str, float]) -> None:
  """Stops at a NaN/Inf loss or gradient, unless such updates are skipped (and then counted)."""
  bad = [name for name in ("loss", "grad_norm") if not math.isfinite(scalars[name])]
  if not bad:
    return
  if skip_nonfinite_updates:
    console.logger.warning("Step %d: non-finite %s; the update was skipped (%d skipped so far).", step,
                           " and ".join(bad), scalars["skipped_updates"])
    return
  became = (f"Step {step}: the {' and the '.join(n.replace('_', ' ') for n in bad)} became "
            f"{scalars[bad[0]]} (loss {scalars['loss']}, gradient norm {scalars['grad_norm']}). Nothing of this "
            "step was saved; the newest checkpoint is intact.")
  if step == 1:  # computed on the initial parameters, before any update: not the learning rate's doing
    raise TrainingError(f"{became} The first step is computed on the initial parameters, before any update, so "
                        "the learning rate played no part: check config.model.init_std (0.02 is usual) or the "
                        "parameters of config.train.init_from, config.model.dtype, and the data.")
  raise TrainingError(
      f"{became} Lower config.train.learning_rate, keep config.train.max_grad_norm > 0, or set "
      "config.train.skip_nonfinite_updates=True to skip such updates.")
