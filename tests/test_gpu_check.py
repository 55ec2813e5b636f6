"""scripts/gpu_check.py on this CPU: its refusal without a GPU, and its measurements on CPU devices (the
attention's XLA path against itself in float32; a tiny train step)."""

import dataclasses
import math
import os
import subprocess
import sys

import jax
import pytest

from tests.helpers import base_config, load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
  return load_script("gpu_check")


def test_refuses_without_a_gpu_saying_where_to_run_it():
  result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2, result.stderr[-2000:]
  assert "gpu_check.py needs a GPU: jax sees cpu devices only" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("window", [0, 64])
def test_attention_errors_are_those_of_bfloat16(gpu_check, window):
  """XLA attention in bfloat16 against itself in float32 (the check's reference): errors of bfloat16's
  rounding, not zero, and within the tolerance cuDNN is held to."""
  errors = gpu_check.attention_errors("xla", window, batch=2, length=256, heads=4, kv_heads=2, head_dim=32)
  assert set(errors) == {"out", "dq", "dk", "dv"}
  assert all(1e-4 < e < gpu_check.TOLERANCE for e in errors.values()), errors


def test_a_wrong_attention_is_caught(gpu_check, monkeypatch):
  """A tested path that drops the documents' mask (each row one document) is far outside the tolerance."""
  original = gpu_check.attention.context
  monkeypatch.setattr(gpu_check.attention, "context", lambda name, segment_ids, window: (
      original("xla", segment_ids * 0 + 1, window) if name == "broken" else original(name, segment_ids, window)))
  errors = gpu_check.attention_errors("broken", 0, batch=2, length=256, heads=4, kv_heads=2, head_dim=32)
  assert errors["out"] > 10 * gpu_check.TOLERANCE, errors


def test_measures_a_train_step(gpu_check):
  c = base_config()
  model = dataclasses.replace(c.model, vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=16, mlp_dim=128, max_seq_len=64)
  train = dataclasses.replace(c.train, seq_len=64, micro_batch_size=4, gradient_accumulation_steps=2)
  config = dataclasses.replace(c, model=model, train=train,
                               mesh=dataclasses.replace(c.mesh, data=1, fsdp=1, tensor=1))
  figures = gpu_check.measure_step(config, 2, jax.devices()[0])
  assert figures["step_seconds"] > 0 and figures["tokens_per_second"] == pytest.approx(8 * 64 / figures["step_seconds"])
  assert figures["planned_bytes"] > 0
  assert math.isnan(figures["mfu"])  # no bfloat16 peak is known for a CPU
  line = gpu_check.describe_step("tiny", figures)
  assert "tokens/s" in line and "planned" in line
