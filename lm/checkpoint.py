"""Orbax checkpoints of the train state (params, optimizer and accumulator state, step), parameters to
start a run from, and what a run needs around them: the checkpoint directory and its disk, saving that
stops the run on failure, and the preemption notice that triggers a last save.

The data position needs no saving: the batch of optimizer step s is a function of (seed, s) alone, so the
step is the data position. The run's config is stored beside the state as JSON, for provenance.

Parameters alone (`scripts/convert_hf.py import` writes them, `train.init_from` reads them) are a
directory with `params/` (an orbax tree `{"params": ...}`, the same tree as in a train state) and
`model.json` (the model section of the config they belong to).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import uuid

import jax
from absl import logging
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lm import console, integrity
from lm.config import MODEL_RUN_SETTINGS, Config, ConfigError, TrainConfig, same_setting
from lm.errors import TrainingError

MODEL_FILE = "model.json"
PARAMS_ITEM = "params"


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


def make_manager(directory: str, cfg: TrainConfig) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=cfg.save_interval_steps,
      max_to_keep=cfg.max_to_keep,
      enable_async_checkpointing=True,  # the copy to host is synchronous; the write overlaps training
      cleanup_tmp_directories=True,  # a save killed half-way leaves a tmp dir, never a valid step
  )
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "config", "progress"))


def reader(directory: str) -> ocp.CheckpointManager:
  """A manager that only reads: for eval and sampling beside a training run that owns the directory
  (it neither saves, deletes, nor cleans up the trainer's in-progress temporary directories)."""
  options = ocp.CheckpointManagerOptions(read_only=True, cleanup_tmp_directories=False, create=False,
                                         save_interval_steps=0, max_to_keep=None)
  # orbax warns that the directory is read only: that is the point.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    # The PyTree handler reads what StandardSave wrote, and can restore a part of it (the params alone).
    return ocp.CheckpointManager(directory, options=options, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})
  finally:
    logging.set_verbosity(verbosity)


def save(manager: ocp.CheckpointManager, step: int, state, config: dict, progress: dict | None = None) -> None:
  """Starts an asynchronous save (orbax first waits for the previous one to finish); a failure stops the
  run with TrainingError rather than let it go on without checkpoints. `progress`: the host side of the
  run at this step (the loss EMA), restored with the state."""
  try:
    seal(manager)  # the previous save is complete: its checksums
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               config=ocp.args.JsonSave(config),
                                               progress=ocp.args.JsonSave(progress or {})), force=True)
    _UNSEALED.setdefault(id(manager), []).append(step)
    manager.check_for_errors()
  except Exception as e:  # orbax re-raises the writer's own error (OSError, tensorstore, ...)
    raise TrainingError(
        f"Saving the checkpoint of step {step} under {manager.directory} failed ({type(e).__name__}: "
        f"{e}). Training stopped rather than go on without checkpoints; the newest complete checkpoint is "
        f"step {manager.latest_step()}. Free disk space or fix the permissions of "
        "config.train.checkpoint_dir and run again to resume.") from e


_UNSEALED: dict[int, list[int]] = {}  # id(manager) -> steps saved whose checksums are not written yet


def seal(manager: ocp.CheckpointManager) -> None:
  """Waits for the saves in flight, then writes each new step's checksums.json (lm/integrity.py; process
  0, the others wait). A step killed before this has none: it is used unverified, with a warning."""
  manager.wait_until_finished()
  steps = _UNSEALED.pop(id(manager), [])
  if steps and jax.process_index() == 0:
    for step in steps:
      directory = epath.Path(str(manager.directory)) / str(step)
      if directory.exists():  # not removed by max_to_keep meanwhile
        integrity.write(str(directory))
  if steps and jax.process_count() > 1:
    multihost_utils.sync_global_devices("checkpoints sealed")


def finish_saves(manager: ocp.CheckpointManager) -> None:
  """Lets a save in flight complete even when the run stops on an error: its state was good."""
  try:
    seal(manager)
  except Exception as e:  # the save's own failure is reported where it surfaced first
    console.logger.warning("A checkpoint save in flight failed too: %s", e)


class PreemptionNotice:
  """Set by SIGTERM (how Cloud TPU, GKE and SLURM announce a preemption) and by a first Ctrl-C (SIGINT):
  the loop finishes its step, saves it and stops. A second Ctrl-C ends the process at once (the signal's
  default action; the newest complete checkpoint stays as it was). With several processes JAX's
  preemption sync point handles SIGTERM instead: every process stops at the same step, which a signal seen
  by one host alone could not give. A context manager: the previous handlers come back when the loop
  ends."""

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager, self._signalled, self.interrupted, self._previous = manager, False, False, {}

  def __enter__(self) -> PreemptionNotice:
    if threading.current_thread() is threading.main_thread():
      if jax.process_count() == 1:
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._signalled = True

  def _on_interrupt(self, signum, frame):
    del signum, frame
    self.interrupted = True
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C: gone at once
    print("\nCtrl-C: finishing this step and saving it; Ctrl-C again exits at once without saving.",
          file=sys.stderr, flush=True)

  def reached(self, step: int) -> bool:
    return self._manager.reached_preemption(step) or self._signalled or self.interrupted


def check_same_step(manager: ocp.CheckpointManager) -> None:
  """Every process must see the same newest checkpoint, or they would resume from different steps (a
  checkpoint directory on a disk that is not shared between the hosts)."""
  if jax.process_count() == 1:
    return
  step = manager.latest_step()
  steps = [int(s) for s in multihost_utils.process_allgather(np.int64(-1 if step is None else step))]
  if len(set(steps)) > 1:
    seen = ", ".join(f"process {i}: {'none' if s < 0 else f'step {s}'}" for i, s in enumerate(steps))
    raise ConfigError(
        f"config.train.checkpoint_dir = {str(manager.directory)!r}: the processes see different newest "
        f"checkpoints ({seen}). All processes must write and read one directory: use a gs:// path or a "
        "file system shared by the hosts.")


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The run description saved with a step (its config and batch arithmetic): the one place it is read."""
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def restore_progress(manager: ocp.CheckpointManager, step: int) -> dict:
  """The `progress` saved with checkpoint `step`; {} for checkpoints written before it was saved."""
  if "progress" not in manager.item_metadata(step).keys():
    return {}
  return manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())).progress or {}


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state):
  """The train state of checkpoint `step`, restored into the shardings of `abstract_state` (the train
  state as `jax.ShapeDtypeStruct`s with `sharding` set)."""
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state


# What decides the shapes and structure of the saved state (and, for norm_unit_offset, what its stored
# norm scales mean): a checkpoint can only resume a run that agrees on all of these.
STATE_KEYS = {
    "model": ("name", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "tie_embeddings", "param_dtype", "scan_layers", "qk_norm", "post_norms",
              "norm_unit_offset", "lora_rank", "lora_targets"),
    "train": ("optimizer", "skip_nonfinite_updates"),
}
# Keys added after checkpoints were first written, with the value those checkpoints had.
ADDED_KEYS = {"model.rope_scaling_factor": 1.0, "model.sliding_window": 0, "model.local_layers_per_global": 0,
              "model.rope_local_theta": 10000.0, "model.qk_norm": False, "model.post_norms": False,
              "model.norm_unit_offset": False, "model.mlp_activation": "silu", "model.embed_scale": False,
              "model.query_scale_dim": 0, "model.lora_rank": 0, "model.lora_alpha": 16.0,
              "model.lora_targets": "q,k,v,o,gate,up,down"}


# What decides the tokens of every step, besides the global batch (warned about by the trainer): a run
# resumed with other values trains on other data from there on than the run it continues.
DATA_KEYS = {"train": ("seed", "seq_len"), "data": ("sources", "tokenizer", "tokenizer_path")}


def data_changes(saved: dict, config: dict) -> list[str]:
  """The DATA_KEYS on which a checkpoint's run description and `config` differ (keys the checkpoint does
  not record, from before they existed, are not compared)."""
  changes = []
  for section, keys in DATA_KEYS.items():
    for key in keys:
      there, here = saved.get(section, {}).get(key), config[section][key]
      if there is not None and json.loads(json.dumps(here)) != there:
        changes.append(f"{section}.{key} = {_short(there)} there, {_short(here)} here")
  return changes


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 200 else text[:200] + "..."


def check_compatible(manager: ocp.CheckpointManager, config: dict) -> tuple[int | None, dict | None]:
  """(newest step whose run description can be read, that description), after checking that it agrees
  with `config` on the state's shapes; raises ConfigError (before anything is restored or written) when
  it does not. A newer step whose description cannot be read is skipped with a warning. (None, None) on
  a fresh start; TrainingError when no step can be read."""
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      saved = saved_config(manager, step)
    except Exception as e:  # orbax raises many types for missing or damaged files
      failures.append(_unreadable(manager.directory, step, e))
      continue
    _check_same_state(manager, step, saved, config)
    return step, saved
  if failures:
    _none_readable(manager.directory, failures)
  return None, None


def _check_same_state(manager: ocp.CheckpointManager, step: int, saved: dict, config: dict) -> None:
  def saved_value(section, key):
    return saved.get(section, {}).get(key, ADDED_KEYS.get(f"{section}.{key}"))

  differences = [f"{section}.{key} = {saved_value(section, key)!r} there, {config[section][key]!r} here"
                 for section, keys in STATE_KEYS.items() for key in keys
                 if saved_value(section, key) != config[section][key]]
  if differences:
    # configs/default.py and bench_60m.py unrolled their layers: say how to resume their older runs.
    scan = (f" To resume it, pass --config.model.scan_layers={saved_value('model', 'scan_layers')}."
            if saved_value("model", "scan_layers") != config["model"]["scan_layers"] else "")
    raise ConfigError(
        f"config.train.checkpoint_dir = {str(manager.directory)!r} holds a checkpoint (step {step}) of "
        f"another model or optimizer: {'; '.join(differences)}. Use a new --workdir (or "
        f"config.train.checkpoint_dir) for this config, or the config that wrote the checkpoint.{scan}")


def newest_restorable(directory, steps, restore):
  """(step, restore(step)) of the newest of `steps` that restores; each newer one that does not is
  warned about (orbax and tensorstore raise many types for missing or damaged files; a ConfigError is the
  config's fault and propagates). TrainingError listing every step's reason when none restores. Training
  and eval share it."""
  failures = []
  for step in sorted(steps, reverse=True):
    try:
      return step, restore(step)
    except ConfigError:
      raise
    except Exception as e:
      failures.append(_unreadable(directory, step, e))
  _none_readable(directory, failures)


def restore_newest(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[int, object, dict]:
  """(step, train state, progress) of the newest checkpoint at or before `step` that restores and
  verifies; newer ones that do not are skipped with a warning and set aside (renamed, nothing deleted), so
  that the run's next saves of those steps do not meet them. TrainingError when none restores."""
  def restore(candidate: int):
    verify(manager.directory, candidate)
    return restore_state(manager, candidate, abstract_state), restore_progress(manager, candidate)

  found, (state, progress) = newest_restorable(manager.directory, [s for s in manager.all_steps() if s <= step],
                                               restore)
  _set_aside(manager, [s for s in manager.all_steps() if s > found])
  return found, state, progress


def verify(directory, step: int) -> None:
  """TrainingError (corrupt) when a file of checkpoint `step` differs from what was saved; a warning when the
  step has no checksums (an older checkpoint, or a run killed before writing them)."""
  try:
    verified = integrity.verify(str(epath.Path(str(directory)) / str(step)))
  except integrity.Corrupt as e:
    raise TrainingError(f"checkpoint step {step} is corrupt: {e}") from None
  if not verified:
    console.logger.warning("%s/%d has no checksums (saved before they existed, or cut off before writing "
                           "them): used unverified.", directory, step)


def _unreadable(directory, step: int, error: Exception) -> str:
  reason = f"step {step}: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
  console.logger.warning("%s/%d cannot be read (%s); falling back to an older checkpoint. Nothing was deleted.",
                         directory, step, reason.split(": ", 1)[1])
  return reason


def _none_readable(directory, failures: list[str]):
  raise TrainingError(
      f"No checkpoint in {directory} can be read: {'; '.join(failures)}. Nothing was deleted: "
      "restore the directory from a copy, move the damaged steps away to start over from the newest good "
      "one, or use a new --workdir.")


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Renames the unreadable checkpoints of `steps` to <step>.unreadable-<time> (process 0; all wait)."""
  if not steps:
    return
  if jax.process_index() == 0:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for step in steps:
      source = epath.Path(str(manager.directory)) / str(step)
      target = source.parent / f"{step}.unreadable-{stamp}"
      source.rename(target)
      console.logger.warning("Set aside %s as %s (unreadable; nothing deleted): the run saves step %d again "
                             "when it gets there.", source, target.name, step)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("checkpoints set aside")
  manager.reload()


@contextlib.contextmanager
def _item_metadata_expected_missing(item: str):
  """Without orbax's warning "Metadata file does not exist: <item>/_CHECKPOINT_METADATA" while `item` is read:
  an item read on its own (a step's `state`, an import's `params`) has none, its step holds it. Users read the
  warning as damage; other warnings pass."""
  missing = os.path.join(item, "_CHECKPOINT_METADATA")

  def expected(record) -> bool:
    return not (record.msg == "Metadata file does not exist: %s" and record.args
                and os.fspath(record.args[0]) == missing)

  logger = logging.get_absl_logger()
  logger.addFilter(expected)
  try:
    yield
  finally:
    logger.removeFilter(expected)


def saved_tree(item: str):
  """The metadata tree (shapes and dtypes) of an orbax PyTree item."""
  with _item_metadata_expected_missing(item):
    metadata = ocp.PyTreeCheckpointer().metadata(item)
  metadata = getattr(metadata, "item_metadata", metadata)
  return dict(getattr(metadata, "tree", metadata))


def _on_one_device(metadata):
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)


def restore_on_one_device(state_path: str):
  """A saved train state as host arrays, whatever mesh wrote it (for inspection and comparisons)."""
  target = _on_one_device(saved_tree(state_path))
  with _item_metadata_expected_missing(state_path):
    return jax.device_get(ocp.StandardCheckpointer().restore(state_path, target))


def abstract_like(shapes, shardings):
  """ShapeDtypeStructs with shardings, the restore target."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def save_params(directory: str, params, model: dict, source: str) -> None:
  """Parameters alone, with the model config they belong to (see the module docstring)."""
  directory = absolute(directory)
  ocp.PyTreeCheckpointer().save(os.path.join(directory, PARAMS_ITEM), {"params": params})
  with open(os.path.join(directory, MODEL_FILE), "w") as f:
    json.dump({"model": model, "source": source}, f, indent=2)


def params_location(path: str, step: int | None = None, adapters: bool = False) -> tuple[str, dict]:
  """(orbax item holding {"params": ...}, model config section) of parameters written by `save_params`
  or of a run's checkpoint directory (its newest step, or `step`). A LoRA run's checkpoint holds adapters,
  not weights: refused unless `adapters`."""
  path = absolute(path)
  if os.path.exists(os.path.join(path, MODEL_FILE)):
    with open(os.path.join(path, MODEL_FILE)) as f:
      return os.path.join(path, PARAMS_ITEM), json.load(f)["model"]
  if "://" not in path and not os.path.isdir(path):
    what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
    raise ConfigError(f"{path} {what}: name a directory written by scripts/convert_hf.py import (holding "
                      f"{MODEL_FILE} and {PARAMS_ITEM}/) or a run's checkpoint directory (<workdir>/checkpoints).")
  manager = reader(path)  # another run's directory: read, never written or cleaned up
  steps = manager.all_steps()
  if not steps and _is_workdir(path):
    raise ConfigError(f"{path} is a run's --workdir, not its checkpoint directory: name {path}/checkpoints, where "
                      "its steps are (or the run's config.train.checkpoint_dir when it set one).")
  if step is None and not steps:
    raise ConfigError(f"{path} holds neither converted parameters ({MODEL_FILE}) nor checkpoint steps.")
  if step is not None and step not in steps:
    raise ConfigError(f"{path} has no checkpoint of step {step}; it has steps {sorted(steps)}.")
  step = max(steps) if step is None else step
  config = saved_config(manager, step)
  if config["model"].get("lora_rank") and not adapters:
    raise ConfigError(f"{path} (step {step}) holds LoRA adapters, not a model's weights. Merge them into the "
                      "weights first: scripts/convert_hf.py export --checkpoint=<this directory> --out=DIR writes the merged "
                      "model, which scripts/convert_hf.py import turns into parameters to start from.")
  return os.path.join(path, str(step), "state"), config["model"]


def _is_workdir(path: str) -> bool:
  """Whether `path` is what main.py's --workdir names: it holds checkpoints/, lease.json or metrics.jsonl."""
  directory = epath.Path(path)
  return (directory / "checkpoints").is_dir() or any((directory / name).exists()
                                                      for name in ("lease.json", "metrics.jsonl"))


def check_same_model(saved: dict, model: dict, where: str) -> None:
  """Raises ConfigError when parameters of the model `saved` cannot mean the same in the model `model`
  (config sections as dicts): every field but the run settings must agree."""
  differences = [f"model.{key} = {saved.get(key, ADDED_KEYS.get(f'model.{key}'))!r} there, {value!r} here"
                 for key, value in model.items()
                 if key not in MODEL_RUN_SETTINGS
                 and not same_setting(saved.get(key, ADDED_KEYS.get(f"model.{key}")), value)]
  if differences:
    raise ConfigError(f"{where} holds parameters of another model: {'; '.join(differences)}. Use the config "
                      "they were written for, or convert the checkpoint for this one.")


def same_base(saved: str, given: str) -> bool:
  """Whether two config.train.init_from values name the same parameters (relative or absolute)."""
  return saved == given or (bool(saved) and bool(given) and absolute(saved) == absolute(given))


def check_same_adapters(saved: dict, config: dict, where: str) -> None:
  """A run's checkpoint holds LoRA adapters when its model.lora_rank > 0: they are read only by a config of
  the same rank, alpha and targets, merged with the same base (config.train.init_from)."""
  model = config["model"]
  rank = saved["model"].get("lora_rank", 0)
  targets = saved["model"].get("lora_targets", ADDED_KEYS["model.lora_targets"])
  alpha = saved["model"].get("lora_alpha", ADDED_KEYS["model.lora_alpha"])
  base = saved.get("train", {}).get("init_from", "")
  if rank and rank == model["lora_rank"] and (targets, alpha) == (model["lora_targets"], model["lora_alpha"]):
    if not same_base(base, config["train"]["init_from"]):
      raise ConfigError(f"{where} holds LoRA adapters of the base config.train.init_from = {base!r}; this config "
                        f"names {config['train']['init_from']!r}: adapters mean nothing on other weights. Pass "
                        f"--config.train.init_from={base}.")
    return
  if not rank and not model["lora_rank"]:
    return
  there = (f"LoRA adapters of rank {rank} on {targets!r} for the base {base!r}" if rank else
           "all the parameters of a model (no LoRA)")
  fix = (f"--config.model.lora_rank={rank} --config.model.lora_alpha={alpha:g} --config.model.lora_targets={targets} "
         f"--config.train.init_from={base}" if rank else "--config.model.lora_rank=0")
  raise ConfigError(f"{where} holds {there}; this config has model.lora_rank = {model['lora_rank']}. Pass {fix}.")


def _paths(tree, prefix=()) -> dict[str, object]:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _paths(sub, prefix + (key,)).items()}
  return {"/".join(prefix): tree}


def check_param_shapes(saved, expected, where: str) -> None:
  """Raises ConfigError naming the first tensor whose shape (or presence) differs, with both shapes."""
  saved, expected = _paths(saved), _paths(expected)
  for name in sorted(set(saved) | set(expected)):
    if name not in saved or name not in expected:
      raise ConfigError(f"{where}: parameter {name} is {'missing there' if name in expected else 'not in this model'}"
                        f"; the parameter trees differ (is model.scan_layers the same?).")
    if tuple(saved[name].shape) != tuple(expected[name].shape):
      raise ConfigError(f"{where}: tensor {name} has shape {tuple(saved[name].shape)} there, "
                        f"{tuple(expected[name].shape)} in this config. Use the config they were written for.")


def restore_params(path: str, abstract_params, step: int | None = None):
  """Parameters of `params_location(path, step)` restored into the shardings of `abstract_params`
  (ShapeDtypeStructs with shardings), after checking their shapes."""
  item, _ = params_location(path, step)
  return restore_params_item(item, abstract_params, path)


def restore_params_item(item: str, abstract_params, where: str):
  """The one way parameters are read: the `params` of an orbax item holding `{"params": ...}` (a train
  state's `state` item, or `save_params`' output), checked against `abstract_params`' shapes (an error
  naming `where`, the tensor and both shapes) and restored into its shardings; nothing else is read."""
  check_param_shapes(saved_tree(item)["params"], abstract_params, where)
  target = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  with _item_metadata_expected_missing(item):
    restored = ocp.PyTreeCheckpointer().restore(item, args=args)
  return restored["params"]


def load_params_on_host(path: str, step: int | None = None, adapters: bool = False) -> tuple[dict, dict]:
  """(parameters as numpy arrays, model config section) of `params_location(path, step, adapters)`,
  whatever mesh wrote them."""
  item, model = params_location(path, step, adapters)
  return jax.device_get(restore_params_item(item, _on_one_device(saved_tree(item)["params"]), path)), model
