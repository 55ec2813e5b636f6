"""`train_and_evaluate(config, workdir)`: set up or resume, then the loop of optimizer steps, for every kind
of training.

A kind of training supplies only what differs (`Kind`): its batches, its loss over a micro-batch, its eval
and its extra figures. `lm.next_token` is pre-training on documents and supervised fine-tuning on
conversations; `lm.grpo` is GRPO (config.grpo.enabled). Everything else is this module's, the same for
every kind: the set-up or the resume, the checks of a resumed run, one program per optimizer step
(`lm.train_step.train_step` with the kind's loss), the figures of a step fetched after the next one is
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

from lm import checkpoint, console, errors, lease, lora, metrics, next_token, profiler, runtime, sharding
from lm.config import Config, ConfigError, profile_step_range, to_dict
from lm.errors import TrainingError
from lm.model import param_count
from lm.optimizer import learning_rate_schedule, make_optimizer
from lm.train_step import TrainState


class Kind(Protocol):
  """What a kind of training supplies to the loop (`lm.next_token.NextToken`, `lm.grpo.GRPO`)."""
  losses: Callable  # (model, params, micro-batch) -> per-sequence "sequence_loss", "sequence_tokens", ...
  steps_per_epoch: int | None  # None: no epochs (config.train.num_train_steps counts the steps)
  evaluate_first: bool  # eval the starting model before the first step of a fresh run

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
    """What an optimizer step does, for tokens/s and MFU: its tokens and model FLOPs on the mesh's devices."""
    plan = self.rt.plan
    flops = metrics.flops_per_token(self.config.model, plan.seq_len).train * plan.tokens_per_step
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
  workdir = checkpoint.absolute(workdir)
  checkpoint.check_writable(workdir, "--workdir")
  if t.wandb_project and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"config.train.wandb_project = {t.wandb_project!r} needs the wandb package: "
                      "pip install -e '.[wandb]', or leave it empty.")
  with lease.Lease(workdir, enabled=jax.process_index() == 0) as held:  # one training per workdir
    return _train(config, workdir, devices, held)


def make_kind(rt: runtime.Runtime) -> Kind:
  """The config's kind of training: GRPO with config.grpo.enabled, else next-token training on its corpus."""
  if rt.config.grpo.enabled:
    from lm import grpo  # here: its sampler and rewards only for a GRPO run
    return grpo.make(rt)
  return next_token.make(rt)


def _train(config: Config, workdir: str, devices, held: lease.Lease) -> dict[str, float]:
  t = config.train
  checkpoint_dir = checkpoint.checkpoint_directory(config, workdir)
  checkpoint.check_writable(checkpoint_dir, "config.train.checkpoint_dir")
  rt = runtime.setup(config, devices)
  latest_step, saved = check_start(config, checkpoint_dir)
  kind = make_kind(rt)
  manager = checkpoint.make_manager(checkpoint_dir, t)  # the writing one, once the data is known good
  num_train_steps = t.num_train_steps or t.num_epochs * kind.steps_per_epoch
  peak, peak_source = metrics.peak_flops_per_device(rt.mesh.devices.flat[0], t.peak_flops_per_device)
  with sharding.activate(rt.mesh):
    fns = runtime.train_functions(rt, make_optimizer(t, num_train_steps), losses=kind.losses)
    state, progress = initial_state(rt, fns, manager, latest_step, t.init_from)
  if latest_step is not None:
    latest_step = int(state.step)  # an older one when the newest could not be restored
  kind.start(fns, state, resumed=latest_step is not None)
  if saved is not None and saved.get("global_batch_sequences") != rt.plan.global_sequences:
    console.logger.warning(
        "The checkpoint was written with a global batch of %s sequences, this run has %d (per-device "
        "micro batch x accumulation x %d data-parallel devices): the steps from here on see a different "
        "data order than the original run would have.", saved.get("global_batch_sequences"),
        rt.plan.global_sequences, rt.plan.data_parallel)
  run = Run(config, workdir, rt, fns.step_fn, kind, manager, num_train_steps, peak, progress=progress, lease=held)
  console.block([
      *_startup_lines(run),
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


def _startup_lines(run: Run) -> list[tuple[str, str]]:
  """The start-up block's lines about the model, the devices, the kind of training and the batch."""
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
    if run.kind.evaluate_first and int(state.step) == 0:
      logger.eval(0, run.kind.evaluate(state))
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
  pending = None  # (step, figures on the device, the kind's host figures) not recorded yet
  for step in range(int(state.step), run.num_train_steps):
    done = step + 1  # the step's number in the log, in TensorBoard and of its checkpoint
    if run.lease is not None:
      run.lease.check()
    profile.before(done)
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


def check_start(config: Config, checkpoint_dir: str) -> tuple[int | None, dict | None]:
  """(newest step, its saved config) of the checkpoint directory, read-only and checked against this config
  (the same model and optimizer, the same data, a step left to train), and init_from's model on a fresh
  start. Read-only until the data is known good: the writing manager starts removing a killed save's
  temporary directories in a thread, which an exit at a mistake in the data cut off (a traceback at
  shutdown); make it after the data."""
  t = config.train
  found = checkpoint.reader(checkpoint_dir)
  checkpoint.check_same_step(found)
  latest_step, saved = checkpoint.check_compatible(found, to_dict(config))
  if latest_step is not None:
    check_resumable(config, latest_step, saved, checkpoint_dir)
  if t.init_from and latest_step is None:  # only a fresh start uses it; checked before the data is read
    _, init_model = checkpoint.params_location(t.init_from)
    checkpoint.check_same_model(init_model, to_dict(config)["model"], f"config.train.init_from = {t.init_from!r}")
  return latest_step, saved


def check_resumable(config: Config, step: int, saved: dict, checkpoint_dir: str) -> None:
  """A resume that would train on other tokens than the checkpoint's run, or that cannot train at all,
  stops with the reason (or, with train.allow_data_change, warns)."""
  t = config.train
  if t.num_train_steps and step > t.num_train_steps:
    raise ConfigError(
        f"{checkpoint_dir} holds step {step}, past config.train.num_train_steps = {t.num_train_steps}: there "
        f"is nothing to train. Raise num_train_steps above {step} to continue the run, or use a new --workdir.")
  if step == t.num_train_steps:
    console.logger.info("%s holds step %d = config.train.num_train_steps: the run is complete, nothing to "
                        "train. Raise num_train_steps to continue it.", checkpoint_dir, step)
  base = saved.get("train", {}).get("init_from", "")
  if config.model.lora_rank and not checkpoint.same_base(base, t.init_from):
    raise ConfigError(
        f"{checkpoint_dir} holds LoRA adapters (step {step}) of the base config.train.init_from = {base!r}; "
        f"this run names {t.init_from!r}. Adapters only mean something on the weights they were trained on: "
        "give the same init_from, or use a new --workdir.")
  if config.grpo.enabled and not checkpoint.same_base(base, t.init_from):
    raise ConfigError(
        f"{checkpoint_dir} holds step {step} of a GRPO run that started from config.train.init_from = {base!r}, "
        f"its KL penalty's reference; this run names {t.init_from!r}. Give the same init_from, or use a new "
        "--workdir.")
  changes = checkpoint.data_changes(saved, to_dict(config))
  if changes and not t.allow_data_change:
    raise ConfigError(
        f"{checkpoint_dir} holds step {step} of a run with other data: {'; '.join(changes)}. Resumed like "
        "this, the steps from here on would train on other tokens than that run's. Use the checkpoint's "
        "values, a new --workdir, or --config.train.allow_data_change=True to change them on purpose.")
  if changes:
    console.logger.warning("Resuming step %d with other data (config.train.allow_data_change): %s", step,
                           "; ".join(changes))


def initial_state(rt: runtime.Runtime, fns: runtime.TrainFunctions, manager: ocp.CheckpointManager,
                   latest_step: int | None, init_from: str) -> tuple[TrainState, dict]:
  """(state, progress): the newest checkpoint that restores (an unreadable newer one is skipped with a
  warning); else parameters from `init_from` with a fresh optimizer; else new."""
  if latest_step is not None:
    _, saved, progress = checkpoint.restore_newest(manager, latest_step, fns.abstract_state.saved())
    # LoRA: the checkpoint holds the adapters; the base they adapt is init_from's (or the seed's) again.
    return TrainState(**saved, frozen=runtime.base_params(rt) if fns.lora else None), progress
  if init_from:
    return fns.state_from_params(checkpoint.restore_params(init_from, fns.abstract_base)), {}
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
