"""GRPO's loss and gradient against TRL's GRPOTrainer (tests/trl_reference.py under .venv-hf) on the same
LoRA adapters, prompts, completions and advantages: an optimizer step of the project is TRL's, and so are
several in a row."""

import dataclasses
import os

import numpy as np
import pytest

from configs import base as base_config
from lm.checkpoints import param_files
from lm.config import from_config_dict
from lm.tools import hf
from tests.helpers import load_script
from tests.test_convert_hf import HF_PYTHON, OURS, convert, ours_config, random_params, write_hf_tokenizer

gradients = load_script("grpo_trl_gradients")
SETTINGS = {"beta": 0.04, "epsilon": 0.2, "temperature": 0.7, "lora_rank": 4, "lora_alpha": 8.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny LLaMA exported with a tokenizer: (its directory, its parameters, the model with adapters, the end
  of text id)."""
  if not os.path.exists(HF_PYTHON):
    pytest.fail(f"{HF_PYTHON} is missing: run `bash scripts/install.sh`, which creates the transformers venv.")
  root = tmp_path_factory.mktemp("grpo_trl")
  base_cfg = ours_config(OURS["ours_llama"])
  base = random_params(base_cfg, seed=3)
  param_files.save_params(str(root / "params"), base, dataclasses.asdict(base_cfg), source="test")
  convert.export_hf(str(root / "params"), str(root / "hf"))
  eos = write_hf_tokenizer(root / "hf")
  cfg = dataclasses.replace(base_cfg, lora_rank=SETTINGS["lora_rank"], lora_alpha=SETTINGS["lora_alpha"])
  return root, base, cfg, eos


def batch(rng, eos: int, lengths) -> dict:
  """Six prompts of 3-7 tokens with completions of `lengths` tokens (every other ending with the end of
  text, the rest truncated) and advantages."""
  prompts = [rng.integers(1, 290, rng.integers(3, 8)).tolist() for _ in range(6)]
  completions = [rng.integers(1, 290, n).tolist() for n in lengths]
  for c in completions[::2]:
    c[-1] = eos
  return {"prompts": prompts, "completions": completions, "advantages": rng.standard_normal(6).astype(np.float32)}


@pytest.fixture(scope="module")
def step(tiny):
  """Adapters off zero (the policy off the reference: a KL and its gradient): the project's step and TRL's
  on one batch."""
  root, base, cfg, eos = tiny
  adapters = gradients.random_adapters(cfg, seed=0, b_std=0.05)
  b = batch(np.random.default_rng(0), eos, (1, 4, 9, 6, 9, 3))
  b["advantages"] *= 0.2
  theirs = gradients.trl_step(str(root / "hf"), str(root / "trl"), adapters, settings=SETTINGS, **b)
  ours = {kl: gradients.project_step(cfg, base, adapters, settings={**SETTINGS, "kl_bias_correction": kl}, **b)
          for kl in (True, False)}
  return ours, theirs


@pytest.fixture(scope="module")
def trained(tiny):
  """Three optimizer steps of both sides from the adapters a run starts with (B = 0: the first step's KL
  and gradient of A are zero), each on its own batch, with weight decay and a gradient clip that binds:
  (ours, theirs, the adapters they started from as PEFT's)."""
  root, base, cfg, eos = tiny
  adapters = gradients.random_adapters(cfg, seed=1, b_std=0.0)
  rng = np.random.default_rng(1)
  steps = [batch(rng, eos, rng.integers(1, 10, 6)) for _ in range(3)]
  train_cfg = dataclasses.replace(from_config_dict(base_config.get_config()).train, learning_rate=1e-2,
                                  warmup_steps=0, schedule="constant", weight_decay=0.1, max_grad_norm=0.05)
  ours = gradients.project_train(cfg, base, adapters, steps, SETTINGS, train_cfg)
  theirs = gradients.trl_train(str(root / "hf"), str(root / "trl_train"), adapters, steps, SETTINGS, train_cfg)
  return ours, theirs, hf.to_peft(adapters)


def test_the_loss_log_probabilities_and_gradient_are_trls(step):
  ours, theirs = step
  result = gradients.compare(ours[True], theirs)
  assert result["loss"][0] == pytest.approx(result["loss"][1], abs=1e-6)  # a sum of terms of either sign
  assert result["logp_max_diff"] < 1e-5
  assert result["grad_relative_error"] < 1e-4, result["by_weight"]


def test_without_the_kl_correction_the_gradient_is_not_trls(step):
  """config.grpo.kl_bias_correction = False: the loss is the same, the gradient of its KL term is not."""
  ours, theirs = step
  result = gradients.compare(ours[False], theirs)
  assert result["loss"][0] == pytest.approx(result["loss"][1], abs=1e-6)
  assert result["grad_relative_error"] > 1e-3, result["by_weight"]


def test_optimizer_steps_end_with_trls_adapters(trained):
  """What the gradient test leaves out, over several steps: AdamW's moments, decoupled weight decay, the clip
  by global norm, the reference and the KL once the adapters have moved."""
  ours, theirs, start = trained
  result = gradients.compare_training(ours, theirs, start)
  for mine, trls in result["losses"]:
    assert mine == pytest.approx(trls, abs=1e-6)
  assert result["change_relative_error"] < 1e-4, result["change_by_weight"]
  assert result["change_norm"] > 0.1  # the steps did move the adapters: the comparison can fail


def test_sampling_bias_tells_the_policy_that_sampled(tiny):
  """scripts/grpo_trl_gradients.py's check that completions were drawn from a policy (log p + H, 0 in
  expectation): the project's sampler, the adapters folded in, passes under the adapted model at the
  sampling temperature, and fails at another one."""
  import jax
  from lm.model import lora, sampling
  from lm.model.decoder import Decoder
  _, base, cfg, eos = tiny
  params = lora.merge(base, gradients.random_adapters(cfg, seed=2, b_std=0.05))
  prompts = np.random.default_rng(2).integers(1, 290, (64, 5)).astype(np.int32)
  new = np.asarray(sampling.generate(lora.fold(params, cfg), prompts, jax.random.key(2),
                                     model=Decoder(dataclasses.replace(cfg, lora_rank=0)), max_new_tokens=24,
                                     sampling=sampling.SamplingConfig(temperature=0.7), stop_ids=(eos,)))
  completions, _ = gradients.grpo.completions_of(new, (eos,))
  step = {"prompts": prompts.tolist(), "completions": completions}
  drawn = gradients.sampling_bias(cfg, params, step, temperature=0.7)
  assert drawn["tokens"] > 1000
  assert abs(drawn["bias"]) < 4 * drawn["standard_error"], drawn
  other = gradients.sampling_bias(cfg, params, step, temperature=1.0)  # flatter than the draws: log p + H > 0
  assert other["bias"] > 6 * other["standard_error"], other
