"""LoRA: the adapted model starts as its base, folding the adapters into the weights gives its function, and
a LoRA run trains the adapters alone, saves them alone, and is read back (eval, export) on its base."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from lm.checkpoints import checkpoint, param_files
from lm.config import from_config_dict, to_dict
from lm.errors import ConfigError
from lm.model import lora
from lm.model.decoder import Decoder
from lm.training import evaluate, metrics
from lm.training.train import train_and_evaluate
from tests.helpers import tiny_model
from tests.test_convert_hf import convert, forward, relative_error
from tests.test_faults import _config
from tests.test_train import corpus  # noqa: F401 (a fixture)


def _init(cfg, tokens):
  ones = jnp.ones_like(tokens)
  return nn.unbox(Decoder(cfg).init(jax.random.key(0), tokens, ones, jnp.cumsum(ones, 1) - 1)["params"])


def _tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 24)), jnp.int32)


@pytest.mark.parametrize("scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_the_adapted_model_starts_as_its_base_and_folds_into_its_weights(scan_layers):
  cfg = tiny_model(lora_rank=4, lora_alpha=8.0, scan_layers=scan_layers)
  base_cfg = dataclasses.replace(cfg, lora_rank=0)
  tokens = _tokens()
  params = _init(cfg, tokens)
  base, adapters = lora.split(params)
  names = {path[-1] for path in traverse_util.flatten_dict(adapters)}
  assert names == {f"{w}{s}" for w in lora.TARGETS.values() for s in lora.SUFFIXES}
  assert jax.tree.structure(base) == jax.tree.structure(_init(base_cfg, tokens))
  # B starts at zero: the same logits as the base model's, exactly.
  assert np.array_equal(forward(cfg, params, tokens), forward(base_cfg, base, tokens))
  # Trained adapters (random here) change the function; folded into the weights they give the same one.
  keys = iter(jax.random.split(jax.random.key(1), 64))
  moved = lora.merge(base, jax.tree.map(lambda a: 0.1 * jax.random.normal(next(keys), a.shape), adapters))
  adapted, folded = forward(cfg, moved, tokens), forward(base_cfg, lora.fold(moved, cfg), tokens)
  assert relative_error(adapted, forward(base_cfg, base, tokens)) > 0.05
  assert relative_error(folded, adapted) < 1e-5  # float32 rounding of W + A B against x W + (x A) B


def test_only_chosen_targets_get_adapters():
  params = _init(tiny_model(lora_rank=2, lora_targets="q,v"), _tokens())
  names = {path[-1] for path in traverse_util.flatten_dict(lora.split(params)[1])}
  assert names == {"q_proj_lora_a", "q_proj_lora_b", "v_proj_lora_a", "v_proj_lora_b"}


@pytest.mark.parametrize("bad,message", [
    (dict(lora_rank=-1), "config.model.lora_rank = -1 must be >= 0"),
    (dict(lora_rank=4, lora_targets="q,attn"), "names ['attn']; give a comma-separated list"),
    (dict(lora_rank=4, lora_alpha=0.0), "config.model.lora_alpha = 0.0 must be > 0"),
])
def test_bad_lora_settings_are_named(bad, message):
  from lm.config import validate_model
  with pytest.raises(ConfigError, match=None) as e:
    validate_model(tiny_model(**bad))
  assert message in str(e.value)


def _base(tmp_path, config) -> str:
  """Parameters of the config's model without adapters (a random one, as a stand-in for an import)."""
  cfg = dataclasses.replace(config.model, lora_rank=0)
  params = jax.device_get(_init(cfg, jnp.zeros((1, 8), jnp.int32)))
  param_files.save_params(str(tmp_path / "base"), params, to_dict(config)["model"] | {"lora_rank": 0}, "test")
  return str(tmp_path / "base")


def test_a_lora_run_trains_and_saves_the_adapters_alone_and_reads_back_on_its_base(tmp_path, corpus):
  c = _config(tmp_path, corpus, num_train_steps=6, save_interval_steps=6, eval_interval_steps=6,
              learning_rate=1e-2, warmup_steps=0, peak_flops_per_device=1e9)
  c.model.lora_rank, c.model.lora_alpha = 4, 8.0
  c.train.init_from = _base(tmp_path, from_config_dict(c))
  config = from_config_dict(c)
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  losses = metrics.read_jsonl(workdir)
  assert losses[6]["loss"] < losses[1]["loss"] - 0.1, losses
  # A run from init_from evaluates the model it starts from first (step 0), then at its eval interval.
  evals = metrics.read_jsonl(workdir, "eval")
  assert sorted(evals) == [0, 6] and evals[6]["loss"] < evals[0]["loss"], evals

  # The checkpoint: the adapters and their optimizer state, nothing of the base.
  saved = checkpoint.saved_tree(os.path.join(workdir, "checkpoints", "6", "state"))
  for part in ("params", "opt_state"):
    paths = list(traverse_util.flatten_dict(saved[part], sep="/"))
    weights = [p for p in paths if any(w in p for w in ("embedding", "lm_head", "scale"))]
    assert paths and not weights, (part, weights)
  assert all(p.endswith(lora.SUFFIXES) for p in traverse_util.flatten_dict(saved["params"], sep="/"))

  # --mode=eval reads the adapters onto the base: the training's eval figure, to the bit.
  assert evaluate.run(config, workdir)[6]["loss"] == metrics.read_jsonl(workdir, "eval")[6]["loss"]

  # Export merges them into the weights: the exported model computes the adapted model's logits.
  out = tmp_path / "hf"
  assert convert.main(["export", f"--checkpoint={workdir}/checkpoints", f"--out={out}"]) == 0
  convert.import_hf(str(out), str(tmp_path / "merged"))
  merged, _ = param_files.load_params_on_host(str(tmp_path / "merged"))
  adapters, _ = param_files.load_params_on_host(f"{workdir}/checkpoints", adapters=True)
  base, _ = param_files.load_params_on_host(config.train.init_from)
  tokens = _tokens()
  adapted = forward(config.model, lora.merge(base, adapters), tokens)
  assert relative_error(forward(dataclasses.replace(config.model, lora_rank=0), merged, tokens), adapted) < 1e-5
  assert relative_error(adapted, forward(config.model, lora.merge(base, jax.tree.map(np.zeros_like, adapters)),
                                         tokens)) > 1e-3  # the adapters did move

  # A resume on another base, an eval without LoRA, init_from a LoRA run: refused, saying what to pass.
  with pytest.raises(ConfigError, match="holds LoRA adapters .* of the base config.train.init_from"):
    train_and_evaluate(dataclasses.replace(config, train=dataclasses.replace(config.train, init_from="")), workdir)
  no_lora = dataclasses.replace(config, model=dataclasses.replace(config.model, lora_rank=0))
  with pytest.raises(ConfigError, match="holds LoRA adapters of rank 4 .* Pass --config.model.lora_rank=4"):
    evaluate.run(no_lora, workdir)
  other_base = dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=""))
  with pytest.raises(ConfigError, match="holds LoRA adapters of the base config.train.init_from = .* this config "
                                        "names '': adapters mean nothing on other weights"):
    evaluate.run(other_base, workdir)  # eval or sample.py without the run's --config.train.init_from
  with pytest.raises(ConfigError, match="holds LoRA adapters, not a model's weights"):
    param_files.load_params_on_host(f"{workdir}/checkpoints")
