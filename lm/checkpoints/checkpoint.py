"""The train state's checkpoints: the orbax managers (the loop's writing one, `Checkpoints`; a read-only one
for eval and sampling), the run description saved beside each step, and the restore of the newest step
that reads and verifies (an unreadable newer one is set aside, never deleted).

The data position needs no saving: the batch of optimizer step s is a function of (seed, s) alone, so the
step is the data position.
"""

from __future__ import annotations

import contextlib
import os
import time

import jax
import jax.numpy as jnp
from absl import logging
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
import numpy as np

from lm import console
from lm.checkpoints import integrity
from lm.config import TrainConfig
from lm.errors import ConfigError, TrainingError


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


class Checkpoints:
  """The writing side of a run's checkpoint directory, owned by the loop: asynchronous saves that stop
  the run on failure, each sealed with its checksums once complete (lm/checkpoints/integrity.py)."""

  def __init__(self, directory: str, cfg: TrainConfig):
    self.manager = make_manager(directory, cfg)
    self._unsealed: list[int] = []  # steps saved whose checksums are not written yet

  def save(self, step: int, state, description: dict, progress: dict | None = None) -> None:
    """Starts an asynchronous save (orbax first waits for the previous one to finish); a failure stops the
    run with TrainingError rather than let it go on without checkpoints. `description`: the run's config and
    batch arithmetic; `progress`: the host side of the run at this step (the loss EMA), restored with it."""
    manager = self.manager
    try:
      self.seal()  # the previous save is complete: its checksums
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 config=ocp.args.JsonSave(description),
                                                 progress=ocp.args.JsonSave(progress or {})), force=True)
      self._unsealed.append(step)
      manager.check_for_errors()
    except Exception as e:  # orbax re-raises the writer's own error (OSError, tensorstore, ...)
      raise TrainingError(
          f"Saving the checkpoint of step {step} under {manager.directory} failed ({type(e).__name__}: "
          f"{e}). Training stopped rather than go on without checkpoints; the newest complete checkpoint is "
          f"step {manager.latest_step()}. Free disk space or fix the permissions of "
          "config.train.checkpoint_dir and run again to resume.") from e

  def seal(self) -> None:
    """Waits for the saves in flight, then writes each new step's checksums.json (process 0, the others
    wait). A step killed before this has none: it is used unverified, with a warning."""
    self.manager.wait_until_finished()
    steps, self._unsealed = self._unsealed, []
    if steps and jax.process_index() == 0:
      for step in steps:
        directory = epath.Path(str(self.manager.directory)) / str(step)
        if directory.exists():  # not removed by max_to_keep meanwhile
          integrity.write(str(directory))
    if steps and jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoints sealed")
    self.manager.check_for_errors()

  def finish(self) -> None:
    """Lets a save in flight complete even when the run stops on an error: its state was good."""
    try:
      self.seal()
    except Exception as e:  # the save's own failure is reported where it surfaced first
      console.logger.warning("A checkpoint save in flight failed too: %s", e)


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
  """The train state of checkpoint `step` ({"params", "opt_state"}), restored into the shardings of
  `abstract_state` (`jax.ShapeDtypeStruct`s with `sharding` set).

  MultiSteps' accumulator (`opt_state.acc_grads`) is zeros between optimizer steps, and a train state
  holds it only where its step scans micro-batches into it (`lm.training.train_step.init_opt_state`;
  every checkpoint before 2026-12-07 held it): a checkpoint that holds one restores into a state without
  (read and dropped), and one without into a state with (zeros in the target's shardings)."""
  opt_state = abstract_state.get("opt_state")
  wanted = getattr(opt_state, "acc_grads", None)
  if not hasattr(opt_state, "acc_grads") or (wanted is not None) == _holds_accumulator(manager, step):
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state
  saved = opt_state._replace(acc_grads=None if wanted is not None else abstract_state["params"])
  target = {**abstract_state, "opt_state": saved}
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
  zeros = None if wanted is None else jax.jit(  # one program for the whole tree, made in place
      lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), wanted),
      out_shardings=jax.tree.map(lambda a: a.sharding, wanted))()
  state["opt_state"] = state["opt_state"]._replace(acc_grads=zeros)
  return state


def _holds_accumulator(manager: ocp.CheckpointManager, step: int) -> bool:
  saved = saved_tree(os.path.join(os.fspath(manager.directory), str(step), "state"))
  return saved.get("opt_state", {}).get("acc_grads") is not None


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
      failures.append(unreadable(directory, step, e))
  none_readable(directory, failures)


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


def unreadable(directory, step: int, error: Exception) -> str:
  reason = f"step {step}: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
  console.logger.warning("%s/%d cannot be read (%s); falling back to an older checkpoint. Nothing was deleted.",
                         directory, step, reason.split(": ", 1)[1])
  return reason


def none_readable(directory, failures: list[str]):
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
def quiet_missing_metadata(item: str):
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
  with quiet_missing_metadata(item):
    metadata = ocp.PyTreeCheckpointer().metadata(item)
  metadata = getattr(metadata, "item_metadata", metadata)
  return dict(getattr(metadata, "tree", metadata))


def on_one_device(metadata):
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)


def restore_on_one_device(state_path: str):
  """A saved train state as host arrays, whatever mesh wrote it (for inspection and comparisons)."""
  target = on_one_device(saved_tree(state_path))
  with quiet_missing_metadata(state_path):
    return jax.device_get(ocp.StandardCheckpointer().restore(state_path, target))


def abstract_like(shapes, shardings):
  """ShapeDtypeStructs with shardings, the restore target."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
