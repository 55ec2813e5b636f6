"""Orbax checkpoints of the train state (params, optimizer and accumulator state, step).

The data position needs no saving: the batch of optimizer step s is a function of (seed, s) alone, so the
step is the data position. The run's config is stored beside the state as JSON, for provenance.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from lm.config import TrainConfig


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


def abstract_like(shapes, shardings):
  """ShapeDtypeStructs with shardings, the restore target."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
