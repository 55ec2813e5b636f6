"""scripts/benchmark_memory.py: the same step asked of both stacks, and their memory read as XLA reports it."""

import dataclasses
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from configs import llama_1_36b
from lm.config import from_config_dict
from lm.tools import hlo
from tests.helpers import base_config, load_script, needs_libtpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
  return load_script("benchmark_memory")


def test_maxtext_is_asked_for_the_same_step(bench):
  """MaxText's per_device_batch_size is its micro-batch per chip (its global batch is that x chips x
  gradient_accumulation_steps), as the project's micro_batch_size."""
  row = bench.ROWS["8k_splash"]
  args = dict(a.split("=", 1) for a in bench.maxtext_args(row, "v5e:2x4", "/tmp/x"))
  assert (args["per_device_batch_size"], args["gradient_accumulation_steps"]) == ("1", "2")
  assert (args["max_target_length"], args["base_num_decoder_layers"]) == ("8192", "2")
  assert (args["attention"], args["remat_policy"], args["compile_topology"]) == ("flash", "minimal", "v5e-8")
  assert (args["dtype"], args["weight_dtype"], args["ici_fsdp_parallelism"]) == ("bfloat16", "float32", "-1")
  m = from_config_dict(llama_1_36b.get_config()).model  # the dimensions are llama_1_36b's
  assert (args["base_emb_dim"], args["base_mlp_dim"], args["vocab_size"]) == (str(m.d_model), str(m.mlp_dim),
                                                                              str(m.vocab_size))
  assert (args["base_num_query_heads"], args["base_num_kv_heads"], args["head_dim"]) == (
      str(m.num_heads), str(m.num_kv_heads), str(m.head_dim))
  assert args["logits_via_embedding"] == str(m.tie_embeddings).lower()
  project = bench.project_command(row, "v5e:2x4")
  for flag in ("--topology=v5e:2x4", "--config.model.attention=splash", "--config.model.num_layers=2",
               "--config.train.seq_len=8192", "--config.train.micro_batch_size=1",
               "--config.train.gradient_accumulation_steps=2", "--config.model.remat=save_dots"):
    assert flag in project


def test_maxtext_memory_is_read_as_the_planner_counts_it(bench):
  """The total from train_compile's `Memory analysis:` line is hlo.live_bytes of the same compiled program
  (arguments + outputs not aliased + temporaries; host figures left out)."""
  f = jax.jit(lambda x, y: (x * 2, jnp.outer(y, y).sum()), donate_argnums=0)
  compiled = f.lower(jnp.ones(1000), jnp.ones(300)).compile()
  text = f"Jitting and compilation complete!\nMemory analysis: {compiled.memory_analysis()}\n"
  got = bench.parse_maxtext(text)
  assert got.total == pytest.approx(hlo.live_bytes(compiled) / 1e9)
  assert got.temporary == pytest.approx(compiled.memory_analysis().temp_size_in_bytes / 1e9)
  with pytest.raises(ValueError, match="lacks sizes"):
    bench.parse_maxtext("Memory analysis: CompiledMemoryStats(host_temp_size_in_bytes=0)")
  with pytest.raises(ValueError, match="printed no memory analysis"):
    bench.parse_maxtext("Starting train_compile.py...\nTraceback ...")


def test_plan_memory_is_read_from_the_planners_own_lines(bench):
  """parse_plan reads the lines scripts/plan.py's describe() writes (a change of their format fails here)."""
  plan = load_script("plan")
  est = plan.Estimate(config=base_config(), mesh_shape={"data": 1, "fsdp": 8, "tensor": 1}, params=683_000_000,
                      optimizer=1_365_000_000, accumulator=0, frozen=0, temporary=6_110_000_000,
                      total=8_853_000_000, compile_seconds=1.0,
                      compiled=types.SimpleNamespace(as_text=lambda: ""))  # an HLO without collectives
  got = bench.parse_plan("\n".join(plan.describe(est, 16, 0.9)))
  assert (got.temporary, got.total) == (6.11, 8.853)
  with pytest.raises(ValueError, match="printed no memory"):
    bench.parse_plan("plan.py: a config error")
  refused = dataclasses.replace(est, compiled=None)  # XLA:TPU refused it: plan.py prints its estimate
  with pytest.raises(ValueError, match="did not compile the step"):
    bench.parse_plan("\n".join(plan.describe(refused, 16, 0.9)))


def test_the_table_without_maxtext_says_the_projects_figures(bench):
  results = {"8k_xla": {"project": bench.Memory(temporary=9.0, total=9.728)}}
  lines = bench.table(["8k_xla"], results, "v5e:2x4")
  assert lines[-1] == "| 8k_xla | 2 layers, seq 8192, micro 1 x 2 | xla | 9.728 | 9.000 |"
  results["8k_xla"]["maxtext"] = bench.Memory(temporary=5.0, total=6.141)
  assert bench.table(["8k_xla"], results, "v5e:2x4")[-1].endswith("| 6.141 | 5.000 | 1.58 |")


def test_unknown_rows_are_refused_naming_the_rows():
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_memory.py"), "--rows=4k_xla"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "--rows: 4k_xla unknown; the rows are 2k_splash, 2k_xla, 8k_splash, 8k_xla." in result.stderr


@pytest.mark.slow
@needs_libtpu
def test_the_projects_row_compiles_for_the_slice():
  """One row end to end, the project's side (2 layers at 8k with splash, XLA:TPU: about a minute)."""
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_memory.py"), "--rows=8k_splash",
                           "--maxtext=false"], capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  row = [l for l in result.stdout.splitlines() if l.startswith("| 8k_splash |")]
  assert len(row) == 1 and 1.0 < float(row[0].split("|")[4]) < 16.0, result.stdout
