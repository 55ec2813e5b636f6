"""`main.py --mode=eval`: the loss of saved checkpoints on the fixed validation set, in its own process.

Restores the parameters alone (not the optimizer or accumulator state) straight into the shardings of the
mesh this process runs on, whatever mesh wrote them; evaluates exactly as training does (same sequences,
same per-sequence sums added in the same order), so on the training mesh the figure is bitwise the one
logged in training. Never writes into the checkpoint directory.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lm import console, distributed, storage
from lm.checkpoints import checkpoint, disk, param_files
from lm.config import Config, to_dict
from lm.data import batching
from lm.errors import ConfigError, TrainingError
from lm.model import lora, sharding
from lm.training import metrics, runtime


def evaluate(eval_fn: Callable, params, batches: batching.EvalBatches, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Loss over the fixed eval batches (each process reads and passes only its devices' rows of them), the
  per-sequence sums added in row order: training's eval and `--mode=eval` give the same figure."""
  rows = batches.batch_size
  mine = sharding.process_rows(mesh, rows)
  fetched = jax.device_get([eval_fn(params, sharding.put_batch(batches.get(b, mine), mesh, rows))
                            for b in range(len(batches))])
  loss_sum, tokens = metrics.sum_losses({k: np.concatenate([f[k] for f in fetched]) for k in fetched[0]})
  loss = loss_sum / max(tokens, 1)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def checkpoint_steps(directory: str, manager: ocp.CheckpointManager) -> list[int]:
  """Complete checkpoints (orbax's own listing); raises TrainingError naming what is there instead."""
  path = epath.Path(directory)
  steps = sorted(manager.all_steps())
  if not steps:
    found = sorted(p.name for p in path.iterdir())
    raise TrainingError(f"No complete checkpoint in {directory}: found {found or 'nothing'}. Train first, or "
                        "wait for the first save (config.train.save_interval_steps).")
  return steps


def partial_checkpoints(directory: str) -> list[str]:
  """Saves that were cut off before orbax committed them (temporary directories)."""
  return sorted(p.name for p in epath.Path(directory).iterdir() if ".orbax-checkpoint-tmp" in p.name)


class ParamsSource:
  """The parameters of a run's checkpoints for a given mesh: latest, a chosen step, or each new one.

  Args:
    config: this config as a dict (`to_dict(config)`): a checkpoint of another model (a switch that changes
      no shape, such as the RoPE base or the MLP activation, included) is refused, and LoRA adapters of
      another rank, alpha, targets or base (train.init_from).
    base: LoRA's base weights, which the adapters restored are merged with (None: no LoRA).
  """

  def __init__(self, checkpoint_dir: str, abstract_params, config: dict, base=None):
    if not epath.Path(checkpoint_dir).exists():
      raise TrainingError(f"No checkpoint: {checkpoint_dir} does not exist. Pass the --workdir of a "
                          "training run (or its config.train.checkpoint_dir).")
    self.directory, self._abstract, self._config, self.base = checkpoint_dir, abstract_params, config, base
    self.manager = checkpoint.reader(checkpoint_dir)
    checkpoint.check_same_step(self.manager)  # several processes must read one directory
    self.steps = checkpoint_steps(checkpoint_dir, self.manager)

  def _restore(self, step: int):
    where = f"{self.directory}/{step}"
    checkpoint.verify(self.directory, step)
    item = str(epath.Path(self.directory) / str(step) / "state")
    saved = checkpoint.saved_config(self.manager, step)
    written = saved and "model" in saved  # runs write their config beside the state
    if written:
      param_files.check_same_adapters(saved, self._config, where)
    param_files.check_param_shapes(checkpoint.saved_tree(item)["params"], self._abstract, where)
    if written:
      param_files.check_same_model(saved["model"], self._config["model"], where)
    return lora.merge(self.base, param_files.restore_params_item(item, self._abstract, where))

  def latest(self) -> tuple[int, object]:
    """The newest checkpoint that can be read; a partial or unreadable one is skipped and said so."""
    for name in partial_checkpoints(self.directory):
      console.logger.warning("%s/%s is a partially written checkpoint (a save cut off): not used.",
                             self.directory, name)
    return checkpoint.newest_restorable(self.directory, self.steps, self._restore)

  def at(self, step: int) -> object:
    if step not in self.steps:
      raise TrainingError(f"--step={step}: there is no checkpoint of step {step} in {self.directory}; it "
                          f"holds steps {self.steps}.")
    try:
      return self._restore(step)
    except ConfigError:
      raise
    except Exception as e:
      raise TrainingError(f"{self.directory}/{step} cannot be read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}). Its save was probably cut off; the complete "
                          f"steps are {self.steps}.") from e

  def follow(self, done: set[int], last_step: int | None, timeout: float,
             poll_seconds: float = 2.0) -> Iterator[tuple[int, object]]:
    """Each complete checkpoint not in `done`, oldest first, as they appear; until `last_step` is
    evaluated (None: no end) or nothing new comes for `timeout` seconds. Only lists the directory (orbax's
    checkpoints_iterator would copy each step into a snapshot directory beside them)."""
    done, quiet_since = set(done), time.monotonic()
    while time.monotonic() - quiet_since < timeout:
      self.manager.reload()
      new = sorted(set(self.manager.all_steps()) - done)
      if not new:
        time.sleep(poll_seconds)
        continue
      quiet_since = time.monotonic()
      for step in new:
        done.add(step)
        try:
          params = self._restore(step)
        except ConfigError:
          raise
        except Exception as e:  # removed by the trainer's max_to_keep meanwhile, for example
          console.logger.warning("Skipping %s/%d: %s", self.directory, step, str(e).splitlines()[0][:300])
          continue
        yield step, params
        if last_step is not None and step >= last_step:
          return
    console.logger.info("No new checkpoint in %s for %g s: stopping.", self.directory, timeout)


class ImportSource:
  """The parameters of an import (`scripts/convert_hf.py import`'s --out, as config.train.init_from names
  it) as the one checkpoint of step 0: a model to evaluate or sample from before any training."""

  def __init__(self, rt: runtime.Runtime, path: str):
    _, model = param_files.params_location(path)
    param_files.check_same_model(model, to_dict(rt.config)["model"], f"config.train.init_from = {path!r}")
    self.directory, self.steps, self._rt = path, [0], rt

  def latest(self) -> tuple[int, object]:
    return 0, self.at(0)

  def at(self, step: int) -> object:
    if step != 0:
      raise TrainingError(f"--step={step}: {self.directory} is an import, whose parameters are step 0.")
    rt, cfg = self._rt, self._rt.config.model
    if not cfg.lora_rank:
      return param_files.restore_params(self.directory, rt.abstract_params)
    # A LoRA config: the import with fresh adapters, whose B = 0 changes nothing.
    adapters = jax.jit(lambda rng: runtime.trainable(sharding.strip_boxes(rt.init_params(rng)), cfg)[0],
                       out_shardings=runtime.trainable(rt.param_sharding, cfg)[0])(rt.rng)
    return lora.merge(runtime.base_params(rt), adapters)

  def follow(self, done, last_step, timeout, poll_seconds=2.0) -> Iterator[tuple[int, object]]:
    return iter(())


def params_source(rt: runtime.Runtime, checkpoint_dir: str) -> ParamsSource | ImportSource:
  """The checkpoints' parameters on `rt`'s mesh; with LoRA, its adapters merged with the base they adapt.
  A run that has saved no checkpoint yet, started from an import (config.train.init_from), gives the
  import's parameters as step 0."""
  init_from = rt.config.train.init_from
  if init_from and not (epath.Path(checkpoint_dir).exists() and checkpoint.reader(checkpoint_dir).all_steps()):
    console.logger.info("No checkpoint in %s: the parameters of config.train.init_from = %s, as step 0.",
                        checkpoint_dir, init_from)
    return ImportSource(rt, init_from)
  adapters, _ = runtime.trainable(rt.abstract_params, rt.config.model)
  source = ParamsSource(checkpoint_dir, adapters, to_dict(rt.config))
  if rt.config.model.lora_rank:  # each checkpoint's own base is compared with this one when it is read
    source.base = runtime.base_params(rt)
  return source


def run(config: Config, workdir: str, *, step: int | None = None, follow: bool = False,
        follow_timeout: float = 3600.0, devices=None) -> dict[int, dict[str, float]]:
  """Evaluates the latest checkpoint (or `step`), then optionally each new one; returns {step: figures}.

  Figures go to TensorBoard under <workdir>/eval (the same tags as training's eval, at the checkpoint's
  step), to <workdir>/eval/metrics.jsonl, and to the console.
  """
  from clu import metric_writers  # here, as TFDS: TensorFlow only where it is used
  from lm.data import corpus
  console.setup(is_main=jax.process_index() == 0)
  workdir = storage.absolute(workdir)
  checkpoint_dir = disk.checkpoint_directory(config, workdir)
  rt = runtime.setup(config, devices)
  with sharding.activate(rt.mesh):
    source = params_source(rt, checkpoint_dir)
    with distributed.process_zero_first():  # process 0 may prepare the data
      _, prepared = corpus.prepare_all(config.data, config.model.vocab_size)
    batches = corpus.eval_batches(config.data, prepared, config.train.seq_len, rt.plan.micro_rows)
    eval_fn = runtime.eval_function(rt)
    console.block([
        ("Mode", "eval" + (f", following new checkpoints (timeout {follow_timeout:g} s)" if follow else "")),
        *runtime.describe(rt),
        ("Checkpoints", f"{source.directory} (steps {source.steps})"),
        ("Eval data", corpus.describe_eval(config.data, batches)),
    ])
    out_dir = os.path.join(workdir, "eval")
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(out_dir, just_logging=not is_main, asynchronous=False)
    log = metrics.JsonlLog(out_dir, enabled=is_main)
    if is_main and not storage.is_remote(out_dir):
      os.makedirs(out_dir, exist_ok=True)

    def record(step: int, params) -> dict[str, float]:
      result = evaluate(eval_fn, params, batches, rt.mesh)
      writer.write_scalars(step, result)
      writer.flush()
      log.write("eval", step, result)
      console.logger.info("%s", console.eval_line(step, result["loss"], result["perplexity"], result["tokens"]))
      return result

    results = {}
    if step is not None:
      results[step] = record(step, source.at(step))
    else:
      latest, params = source.latest()
      results[latest] = record(latest, params)
    if follow:
      last = config.train.num_train_steps or None  # an epoch-based run: until the timeout
      if last is None or max(results) < last:
        for new_step, params in source.follow(set(source.steps) | set(results), last, follow_timeout):
          results[new_step] = record(new_step, params)
    writer.close()
    return results


def params_for_inference(config: Config, workdir: str | None, *, step: int | None = None, devices=None):
  """(step, params, mesh) of the latest checkpoint (or `step`) for sampling, on this process's mesh; with
  no workdir, those of the import config.train.init_from names (step 0)."""
  if workdir is None and not config.train.init_from:
    raise ConfigError("Nothing to sample from: give the --workdir of a run, or an import's directory as "
                      "--init_from (or config.train.init_from).")
  rt = runtime.setup(config, devices)
  with sharding.activate(rt.mesh):
    source = (ImportSource(rt, config.train.init_from) if workdir is None else
              params_source(rt, disk.checkpoint_directory(config, storage.absolute(workdir))))
    if step is None:
      step, params = source.latest()
    else:
      params = source.at(step)
  return step, params, rt.mesh
