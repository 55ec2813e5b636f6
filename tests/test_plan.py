"""scripts/plan.py: the printed plan of a small config, and a suggestion when the step does not fit."""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from tests.helpers import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = os.path.join(ROOT, "scripts", "plan.py")
SMALL = ["--config.model.vocab_size=512", "--config.model.d_model=64", "--config.model.num_layers=2",
         "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
         "--config.model.mlp_dim=128", "--config.model.max_seq_len=64", "--config.train.seq_len=64",
         "--config.train.micro_batch_size=8", "--config.train.gradient_accumulation_steps=2"]


@pytest.fixture(scope="module")
def plan():
  """The script as a module: it leaves XLA_FLAGS alone when imported, so it sees conftest's 8 devices."""
  spec = importlib.util.spec_from_file_location("plan", PLAN)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def small_config():
  c = base_config()
  model = dataclasses.replace(c.model, vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=16, mlp_dim=128, max_seq_len=64)
  train = dataclasses.replace(c.train, seq_len=64, micro_batch_size=8, gradient_accumulation_steps=2)
  return dataclasses.replace(c, model=model, train=train)


def test_prints_the_plan_for_the_devices_asked():
  # --devices=4 must reach XLA before jax starts (the environment says 8): the -1 data axis shows it.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, PLAN, f"--config={ROOT}/configs/default.py", *SMALL, "--devices=4",
                           "--device_kind=v5e", "--mfu=0.5"], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  for field in ("Mesh: data=4 x fsdp=1 x tensor=1", "micro_batch_size 8 x gradient_accumulation_steps 2 x 4 data-parallel devices = 64 sequences",
                "parameters", "optimizer state", "accumulator", "temporary", "of 16 GB", ": fits",
                "FLOPs per step", "At MFU 0.5 on 4 x 1.97e+14 FLOP/s: step time", "tokens/s", "HFU",
                "an estimate of TPU/GPU memory", "Model: 139,584 parameters",
                # 4 data-parallel replicas at accumulation 2: the gradient is all-reduced once per step.
                "Collectives per optimizer step and device: all-reduce 2 x"):
    assert field in out, (field, out)


def test_suggests_what_fits_when_the_memory_is_too_small(plan):
  config = small_config()
  full = plan.Estimator(8)(config)
  # Adam's two moments and the accumulator, in float32 like the parameters (plus a few scalars).
  assert full.params > 0 and full.accumulator == full.params
  assert full.optimizer == pytest.approx(2 * full.params, abs=64)
  # A device with 80% of what the step needs (all of it usable): a smaller micro-batch must do.
  memory_gb = 0.8 * full.total / plan.GB
  lines = plan.report(config, 8, "v5e", memory_gb, usable=1.0, mfu=0.4, hardware_flops=False)
  text = "\n".join(lines)
  assert "does NOT fit" in text and "Does not fit. Tried" in text, text
  suggestion = next(line for line in lines if line.startswith("Suggestion:"))
  assert "micro_batch_size=8 " not in suggestion and "remat=none" in suggestion, text
  assert "micro_batch_size=4 gradient_accumulation_steps=4" in suggestion, text  # same global batch
  assert "fits" in text.split("Suggestion:")[1]
