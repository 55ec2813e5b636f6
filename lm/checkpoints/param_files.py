"""Parameters alone, to start a run from (`scripts/convert_hf.py import` writes them, `train.init_from` reads
them): a directory with `params/` (an orbax tree `{"params": ...}`, the same tree as in a train state) and
`model.json` (the model section of the config they belong to); or a run's checkpoint directory, whose
newest step's parameters are read alone. And the checks that parameters fit the model they are loaded into.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from lm.checkpoints import checkpoint
from lm.config import ADDED_KEYS, MODEL_RUN_SETTINGS, same_setting
from lm.errors import ConfigError
from lm.storage import absolute, is_remote


MODEL_FILE = "model.json"


PARAMS_ITEM = "params"


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
  if not is_remote(path) and not os.path.isdir(path):
    what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
    raise ConfigError(f"{path} {what}: name a directory written by scripts/convert_hf.py import (holding "
                      f"{MODEL_FILE} and {PARAMS_ITEM}/) or a run's checkpoint directory (<workdir>/checkpoints).")
  manager = checkpoint.reader(path)  # another run's directory: read, never written or cleaned up
  steps = manager.all_steps()
  if not steps and _is_workdir(path):
    raise ConfigError(f"{path} is a run's --workdir, not its checkpoint directory: name {path}/checkpoints, where "
                      "its steps are (or the run's config.train.checkpoint_dir when it set one).")
  if step is None and not steps:
    raise ConfigError(f"{path} holds neither converted parameters ({MODEL_FILE}) nor checkpoint steps.")
  if step is not None and step not in steps:
    raise ConfigError(f"{path} has no checkpoint of step {step}; it has steps {sorted(steps)}.")
  step = max(steps) if step is None else step
  config = checkpoint.saved_config(manager, step)
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
  check_param_shapes(checkpoint.saved_tree(item)["params"], abstract_params, where)
  target = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  with checkpoint.quiet_missing_metadata(item):
    restored = ocp.PyTreeCheckpointer().restore(item, args=args)
  return restored["params"]


def load_params_on_host(path: str, step: int | None = None, adapters: bool = False) -> tuple[dict, dict]:
  """(parameters as numpy arrays, model config section) of `params_location(path, step, adapters)`,
  whatever mesh wrote them."""
  item, model = params_location(path, step, adapters)
  target = checkpoint.on_one_device(checkpoint.saved_tree(item)["params"])
  return jax.device_get(restore_params_item(item, target, path)), model
