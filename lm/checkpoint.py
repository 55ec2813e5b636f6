"""Orbax checkpoints of the train state (params, optimizer and accumulator state, step).

The data position needs no saving: the batch of optimizer step s is a function of (seed, s) alone, so the
step is the data position. The run's config is stored beside the state as JSON, for provenance.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from lm.config import ConfigError, TrainConfig


def make_manager(directory: str, cfg: TrainConfig) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=cfg.save_interval_steps,
      max_to_keep=cfg.max_to_keep,
      enable_async_checkpointing=True,  # the copy to host is synchronous; the write overlaps training
      cleanup_tmp_directories=True,  # a save killed half-way leaves a tmp dir, never a valid step
  )
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "config"))


def save(manager: ocp.CheckpointManager, step: int, state, config: dict) -> bool:
  """Starts an asynchronous save; orbax first waits for the previous one to finish."""
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    config=ocp.args.JsonSave(config)), force=True)


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

