"""scripts/benchmark.py on a tiny model: one JSON line with sane figures for each variant run."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.vocab_size=512", "--config.model.d_model=64", "--config.model.num_layers=2",
        "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
        "--config.model.mlp_dim=128", "--config.model.max_seq_len=64", "--config.train.seq_len=64"]
VARIANT_KEYS = {"name", "path", "dtype", "micro_batch_size", "accumulation_steps", "tokens_per_step",
                "step_time_median", "step_time_min", "step_times", "tokens_per_sec", "mfu", "compile_seconds", "peak_rss_mb",
                "rss_before_mb", "xla_temp_mb"}


# A plain JAX image (a GPU machine with jax, flax, optax and orbax): TensorFlow, TFDS and CLU cannot be
# imported (None in sys.modules makes an import fail).
WITHOUT_TENSORFLOW = ("import runpy, sys\n"
                      "for name in ('tensorflow', 'tensorflow_datasets', 'clu'): sys.modules[name] = None\n"
                      "sys.argv = sys.argv[1:]\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@pytest.mark.slow  # 25-30 s
def test_benchmark_prints_one_json_line_without_tensorflow(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")  # the machine's one CPU device
  output = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, "-c", WITHOUT_TENSORFLOW, os.path.join(ROOT, "scripts", "benchmark.py"),
       f"--config={ROOT}/configs/bench_60m.py", *TINY, "--steps=2", "--peak_size=256",
       "--variants=minimal_f32,project_f32_accum4", f"--output={output}"], env=env, capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line for line in result.stdout.splitlines() if line.strip()]
  assert len(lines) == 1, result.stdout
  report = json.loads(lines[0])
  assert json.loads(output.read_text()) == report
  assert report["config"].endswith("configs/bench_60m.py") and report["devices"] == 1
  assert set(report["peak_flops"]) == {"float32"} and report["peak_flops"]["float32"] > 0
  minimal, project = report["variants"]
  assert (minimal["name"], project["name"]) == ("minimal_f32", "project_f32_accum4")
  # 8 sequences of 64 tokens per optimizer step either way; the project splits them into 4 x 2.
  assert (project["micro_batch_size"], project["accumulation_steps"]) == (2, 4)
  for variant in (minimal, project):
    assert set(variant) == VARIANT_KEYS, variant
    assert variant["tokens_per_step"] == 8 * 64
    assert len(variant["step_times"]) == 2 and variant["step_time_median"] > 0
    assert variant["tokens_per_sec"] > 0 and 0 < variant["mfu"] < 1
    assert variant["compile_seconds"] > 0 and variant["xla_temp_mb"] > 0
    assert 100 < variant["rss_before_mb"] <= variant["peak_rss_mb"]
  assert report["ratios"] == {}  # each ratio needs a pair of variants that did not both run
