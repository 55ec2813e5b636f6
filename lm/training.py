"""What the two trainers share, pre-training (`lm.train`) and GRPO (`lm.grpo`): the read-only checks of a
run's checkpoint directory before it starts, its initial state (resumed, from init_from, or new), the figures
of a step (tokens and model FLOPs) and the stop at a non-finite loss."""

from __future__ import annotations

import math

import orbax.checkpoint as ocp

from lm import checkpoint, console, metrics, runtime
from lm.config import Config, ConfigError, to_dict
from lm.errors import TrainingError
from lm.train_step import TrainState


def throughput(rt: runtime.Runtime, peak_flops_per_device: float) -> metrics.Throughput:
  """What an optimizer step does, for tokens/s and MFU: its tokens and model FLOPs on the mesh's devices."""
  plan = rt.plan
  flops = metrics.flops_per_token(rt.config.model, plan.seq_len).train * plan.tokens_per_step
  return metrics.Throughput(plan.tokens_per_step, flops, rt.mesh.devices.size, peak_flops_per_device)


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
