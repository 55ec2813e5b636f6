"""Whether a run may start on a checkpoint directory, read-only before anything is written: the same model
and optimizer as the checkpoint's (the compatibility rules), the same data (or a warning when allowed), a
step left to train, and init_from's model on a fresh start."""

from __future__ import annotations

import json

import orbax.checkpoint as ocp

from lm import console
from lm.checkpoints import checkpoint, param_files
from lm.config import ADDED_KEYS, Config, to_dict
from lm.errors import ConfigError


# What decides the shapes and structure of the saved state (and, for norm_unit_offset, what its stored
# norm scales mean): a checkpoint can only resume a run that agrees on all of these.
STATE_KEYS = {
    "model": ("name", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "tie_embeddings", "param_dtype", "scan_layers", "qk_norm", "post_norms",
              "norm_unit_offset", "lora_rank", "lora_targets"),
    "train": ("optimizer", "skip_nonfinite_updates"),
}


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
      saved = checkpoint.saved_config(manager, step)
    except Exception as e:  # orbax raises many types for missing or damaged files
      failures.append(checkpoint.unreadable(manager.directory, step, e))
      continue
    _check_same_state(manager, step, saved, config)
    return step, saved
  if failures:
    checkpoint.none_readable(manager.directory, failures)
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


def check_start(config: Config, checkpoint_dir: str) -> tuple[int | None, dict | None]:
  """(newest step, its saved config) of the checkpoint directory, read-only and checked against this config
  (the same model and optimizer, the same data, a step left to train), and init_from's model on a fresh
  start. Read-only until the data is known good: the writing manager starts removing a killed save's
  temporary directories in a thread, which an exit at a mistake in the data cut off (a traceback at
  shutdown); make it after the data."""
  t = config.train
  found = checkpoint.reader(checkpoint_dir)
  checkpoint.check_same_step(found)
  latest_step, saved = check_compatible(found, to_dict(config))
  if latest_step is not None:
    check_resumable(config, latest_step, saved, checkpoint_dir)
  if t.init_from and latest_step is None:  # only a fresh start uses it; checked before the data is read
    _, init_model = param_files.params_location(t.init_from)
    param_files.check_same_model(init_model, to_dict(config)["model"], f"config.train.init_from = {t.init_from!r}")
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
  if config.model.lora_rank and not param_files.same_base(base, t.init_from):
    raise ConfigError(
        f"{checkpoint_dir} holds LoRA adapters (step {step}) of the base config.train.init_from = {base!r}; "
        f"this run names {t.init_from!r}. Adapters only mean something on the weights they were trained on: "
        "give the same init_from, or use a new --workdir.")
  if config.grpo.enabled and not param_files.same_base(base, t.init_from):
    raise ConfigError(
        f"{checkpoint_dir} holds step {step} of a GRPO run that started from config.train.init_from = {base!r}, "
        f"its KL penalty's reference; this run names {t.init_from!r}. Give the same init_from, or use a new "
        "--workdir.")
  changes = data_changes(saved, to_dict(config))
  if changes and not t.allow_data_change:
    raise ConfigError(
        f"{checkpoint_dir} holds step {step} of a run with other data: {'; '.join(changes)}. Resumed like "
        "this, the steps from here on would train on other tokens than that run's. Use the checkpoint's "
        "values, a new --workdir, or --config.train.allow_data_change=True to change them on purpose.")
  if changes:
    console.logger.warning("Resuming step %d with other data (config.train.allow_data_change): %s", step,
                           "; ".join(changes))
