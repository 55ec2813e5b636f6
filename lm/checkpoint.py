"""Orbax checkpoints of the train state (params, optimizer and accumulator state, step), and parameters
to start a run from.

The data position needs no saving: the batch of optimizer step s is a function of (seed, s) alone, so the
step is the data position. The run's config is stored beside the state as JSON, for provenance.

Parameters alone (`scripts/convert_hf.py import` writes them, `train.init_from` reads them) are a
directory with `params/` (an orbax tree `{"params": ...}`, the same tree as in a train state) and
`model.json` (the model section of the config they belong to).
"""

from __future__ import annotations

import json
import os

import jax
from absl import logging
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lm.config import MODEL_RUN_SETTINGS, ConfigError, TrainConfig

MODEL_FILE = "model.json"
PARAMS_ITEM = "params"


def make_manager(directory: str, cfg: TrainConfig) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=cfg.save_interval_steps,
      max_to_keep=cfg.max_to_keep,
      enable_async_checkpointing=True,  # the copy to host is synchronous; the write overlaps training
      cleanup_tmp_directories=True,  # a save killed half-way leaves a tmp dir, never a valid step
  )
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "config"))


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


def save(manager: ocp.CheckpointManager, step: int, state, config: dict) -> bool:
  """Starts an asynchronous save; orbax first waits for the previous one to finish."""
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    config=ocp.args.JsonSave(config)), force=True)


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


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """(state, saved run description) of the newest checkpoint, restored into the shardings of
  `abstract_state`; (None, None) on a fresh start.

  Args:
    abstract_state: the train state as `jax.ShapeDtypeStruct`s with `sharding` set.
  """
  step = manager.latest_step()
  if step is None:
    return None, None
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                           config=ocp.args.JsonRestore()))
  return restored.state, restored.config


# What decides the shapes and structure of the saved state (and, for norm_unit_offset, what its stored
# norm scales mean): a checkpoint can only resume a run that agrees on all of these.
STATE_KEYS = {
    "model": ("name", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "tie_embeddings", "param_dtype", "scan_layers", "qk_norm", "post_norms",
              "norm_unit_offset"),
    "train": ("optimizer", "skip_nonfinite_updates"),
}
# Keys added after checkpoints were first written, with the value those checkpoints had.
ADDED_KEYS = {"model.rope_scaling_factor": 1.0, "model.sliding_window": 0, "model.local_layers_per_global": 0,
              "model.rope_local_theta": 10000.0, "model.qk_norm": False, "model.post_norms": False,
              "model.norm_unit_offset": False, "model.mlp_activation": "silu", "model.embed_scale": False,
              "model.query_scale_dim": 0}


def check_compatible(manager: ocp.CheckpointManager, config: dict) -> int | None:
  """The newest step, after checking that its run description agrees with `config` on the state's
  shapes; raises ConfigError (before anything is restored or written) when it does not."""
  step = manager.latest_step()
  if step is None:
    return None
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def saved_value(section, key):
    return saved.get(section, {}).get(key, ADDED_KEYS.get(f"{section}.{key}"))

  differences = [f"{section}.{key} = {saved_value(section, key)!r} there, {config[section][key]!r} here"
                 for section, keys in STATE_KEYS.items() for key in keys
                 if saved_value(section, key) != config[section][key]]
  if differences:
    raise ConfigError(
        f"config.train.checkpoint_dir = {str(manager.directory)!r} holds a checkpoint (step {step}) of "
        f"another model or optimizer: {'; '.join(differences)}. Use a new --workdir (or "
        "config.train.checkpoint_dir) for this config, or the config that wrote the checkpoint.")
  return step


def restore_on_one_device(state_path: str):
  """A saved train state as host arrays, whatever mesh wrote it (for inspection and comparisons)."""
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(state_path)
  metadata = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  return jax.device_get(checkpointer.restore(state_path, target))


def abstract_like(shapes, shardings):
  """ShapeDtypeStructs with shardings, the restore target."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def save_params(directory: str, params, model: dict, source: str) -> None:
  """Parameters alone, with the model config they belong to (see the module docstring)."""
  directory = _absolute(directory)
  ocp.PyTreeCheckpointer().save(os.path.join(directory, PARAMS_ITEM), {"params": params})
  with open(os.path.join(directory, MODEL_FILE), "w") as f:
    json.dump({"model": model, "source": source}, f, indent=2)


def params_location(path: str, step: int | None = None) -> tuple[str, dict]:
  """(orbax item holding {"params": ...}, model config section) of parameters written by `save_params`
  or of a run's checkpoint directory (its newest step, or `step`)."""
  path = _absolute(path)
  if os.path.exists(os.path.join(path, MODEL_FILE)):
    with open(os.path.join(path, MODEL_FILE)) as f:
      return os.path.join(path, PARAMS_ITEM), json.load(f)["model"]
  if "://" not in path and not os.path.isdir(path):
    raise ConfigError(f"{path} does not exist: name a directory written by scripts/convert_hf.py import or a "
                      "run's checkpoint directory.")
  manager = reader(path)  # another run's directory: read, never written or cleaned up
  steps = manager.all_steps()
  if step is None and not steps:
    raise ConfigError(f"{path} holds neither converted parameters ({MODEL_FILE}) nor checkpoint steps.")
  if step is not None and step not in steps:
    raise ConfigError(f"{path} has no checkpoint of step {step}; it has steps {sorted(steps)}.")
  step = max(steps) if step is None else step
  config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  return os.path.join(path, str(step), "state"), config["model"]


def check_same_model(saved: dict, model: dict, where: str) -> None:
  """Raises ConfigError when parameters of the model `saved` cannot mean the same in the model `model`
  (config sections as dicts): every field but the run settings must agree."""
  differences = [f"model.{key} = {saved.get(key, ADDED_KEYS.get(f'model.{key}'))!r} there, {value!r} here"
                 for key, value in model.items()
                 if key not in MODEL_RUN_SETTINGS and saved.get(key, ADDED_KEYS.get(f"model.{key}")) != value]
  if differences:
    raise ConfigError(f"{where} holds parameters of another model: {'; '.join(differences)}. Use the config "
                      "they were written for, or convert the checkpoint for this one.")


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


def _saved_params(item: str):
  metadata = ocp.PyTreeCheckpointer().metadata(item)
  metadata = getattr(metadata, "item_metadata", metadata)
  return dict(getattr(metadata, "tree", metadata))["params"]


def restore_params(path: str, abstract_params, step: int | None = None):
  """Parameters of `params_location(path, step)` restored into the shardings of `abstract_params`
  (ShapeDtypeStructs with shardings), after checking their shapes."""
  item, _ = params_location(path, step)
  check_param_shapes(_saved_params(item), abstract_params, path)
  target = {"params": abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(
      item, args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                        partial_restore=True))
  return restored["params"]


def load_params_on_host(path: str, step: int | None = None) -> tuple[dict, dict]:
  """(parameters as numpy arrays, model config section) of `params_location(path, step)`, whatever mesh
  wrote them."""
  item, model = params_location(path, step)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), _saved_params(item))
  return jax.device_get(restore_params(path, abstract, step)), model
