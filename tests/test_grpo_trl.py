"""GRPO's loss and gradient against TRL's GRPOTrainer (tests/trl_reference.py under .venv-hf) on the same
LoRA adapters, prompts, completions and advantages: an optimizer step of the project is TRL's."""

import dataclasses
import os

import numpy as np
import pytest

from lm.checkpoints import param_files
from tests.helpers import load_script
from tests.test_convert_hf import HF_PYTHON, OURS, convert, ours_config, random_params, write_hf_tokenizer

gradients = load_script("grpo_trl_gradients")
SETTINGS = {"beta": 0.04, "epsilon": 0.2, "temperature": 0.7, "lora_rank": 4, "lora_alpha": 8.0}


@pytest.fixture(scope="module")
def step(tmp_path_factory):
  """A tiny LLaMA exported with a tokenizer, adapters off zero (the policy off the reference: a KL and its
  gradient), prompts of 3-7 tokens with completions of 1-9 (some ending with the end of text, some not):
  the project's step on them and TRL's."""
  if not os.path.exists(HF_PYTHON):
    pytest.fail(f"{HF_PYTHON} is missing: run `bash scripts/install.sh`, which creates the transformers venv.")
  root = tmp_path_factory.mktemp("grpo_trl")
  base_cfg = ours_config(OURS["ours_llama"])
  base = random_params(base_cfg, seed=3)
  param_files.save_params(str(root / "params"), base, dataclasses.asdict(base_cfg), source="test")
  convert.export_hf(str(root / "params"), str(root / "hf"))
  eos = write_hf_tokenizer(root / "hf")
  cfg = dataclasses.replace(base_cfg, lora_rank=SETTINGS["lora_rank"], lora_alpha=SETTINGS["lora_alpha"])
  adapters = gradients.random_adapters(cfg, seed=0, b_std=0.05)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 290, rng.integers(3, 8)).tolist() for _ in range(6)]
  completions = [rng.integers(1, 290, n).tolist() for n in (1, 4, 9, 6, 9, 3)]
  for c in completions[:3]:
    c[-1] = eos
  advantages = rng.standard_normal(6).astype(np.float32) * 0.2
  theirs = gradients.trl_step(str(root / "hf"), str(root / "trl"), adapters, prompts, completions, advantages,
                              SETTINGS)
  ours = {kl: gradients.project_step(cfg, base, adapters, prompts, completions, advantages,
                                     {**SETTINGS, "kl_bias_correction": kl})
          for kl in (True, False)}
  return ours, theirs


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
