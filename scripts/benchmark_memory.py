"""Memory per chip of the same training step in this project and in MaxText, both compiled by XLA:TPU.

  python scripts/benchmark_memory.py                       # the four rows; MaxText beside where installed
  bash scripts/install_maxtext.sh                          # MaxText 0.2.5 in .venv-maxtext (opt-in, locked)
  python scripts/benchmark_memory.py --rows=8k_splash,8k_xla --maxtext=false --slice=v6e:2x4

Each row is one optimizer step of llama_1_36b's dimensions (d_model 2048, 16 heads of 128, SwiGLU 5632, vocab
32,000) on --slice (v5e:2x4: FSDP over its 8 chips), compute in bfloat16, parameters and Adam in float32,
remat save_dots (MaxText's `minimal`), the same tokens per micro-step per chip. The project's figure is
`scripts/plan.py --topology=...` (XLA:TPU's compile of the real train step, --memory_gb high so that nothing
is searched); MaxText's is its own ahead-of-time compile (`maxtext.trainers.pre_train.train_compile`, in
.venv-maxtext), given the libtpu the planner loads (TPU_LIBRARY_PATH): one jax, one XLA:TPU. Total per chip
= arguments + outputs not aliased to them + temporaries, XLA's memory analysis on both sides. 2-4 minutes a
row and side on 2 cores.
"""

import dataclasses
import functools
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import llama_1_36b  # noqa: E402
from lm.config import ModelConfig, from_config_dict  # noqa: E402
from lm.tools import topology  # noqa: E402  (no jax import: the subprocesses compile)


@dataclasses.dataclass(frozen=True)
class Row:
  layers: int
  seq_len: int
  micro_batch: int
  accumulation: int
  attention: str  # the project's model.attention: splash or xla

  @property
  def work(self) -> str:
    return f"{self.layers} layers, seq {self.seq_len}, micro {self.micro_batch} x {self.accumulation}"


ROWS = {
    "2k_splash": Row(24, 2048, 2, 256, "splash"),
    "2k_xla": Row(24, 2048, 2, 256, "xla"),
    "8k_splash": Row(2, 8192, 1, 2, "splash"),
    "8k_xla": Row(2, 8192, 1, 2, "xla"),
}
MAXTEXT_ATTENTION = {"splash": "flash", "xla": "dot_product"}
MAXTEXT_TOPOLOGY = {"v5e:2x4": "v5e-8", "v5e:4x4": "v5e-16", "v6e:2x4": "v6e-8", "v5p:2x2x1": "v5p-8"}
MAXTEXT_PYTHON = os.path.join(ROOT, ".venv-maxtext", "bin", "python")
MAXTEXT_INSTALLED = os.path.join(ROOT, ".venv-maxtext", "lock.sha256")  # written by install_maxtext.sh when done
MAXTEXT_LOCK = os.path.join(ROOT, "requirements", "maxtext.txt")

_ROWS = flags.DEFINE_list("rows", list(ROWS), f"Rows of the table: some of {', '.join(ROWS)}.")
_SLICE = flags.DEFINE_enum("slice", "v5e:2x4", list(MAXTEXT_TOPOLOGY), "The TPU slice, as libtpu names it (plan.py's "
                           "--topology).")
_MAXTEXT = flags.DEFINE_bool("maxtext", True, "Also compile MaxText's step, where scripts/install_maxtext.sh "
                             "installed it (else the project's figures alone, saying so).")


@dataclasses.dataclass(frozen=True)
class Memory:
  temporary: float  # GB per chip
  total: float

  def cells(self) -> list[str]:
    return [f"{self.total:.3f}", f"{self.temporary:.3f}"]


@functools.cache
def llama_model() -> ModelConfig:
  """configs/llama_1_36b.py's model: the dimensions both stacks are given."""
  return from_config_dict(llama_1_36b.get_config()).model


def project_command(row: Row, topology_name: str) -> list[str]:
  """scripts/plan.py for the row, the fit search off (--memory_gb far above any chip)."""
  return [sys.executable, os.path.join(ROOT, "scripts", "plan.py"), "--config=configs/llama_1_36b.py",
          f"--topology={topology_name}", "--hardware_flops=false", "--memory_gb=10000",
          "--config.model.remat=save_dots", "--config.model.dtype=bfloat16",
          f"--config.model.attention={row.attention}", f"--config.model.num_layers={row.layers}",
          f"--config.train.seq_len={row.seq_len}", f"--config.model.max_seq_len={max(row.seq_len, llama_model().max_seq_len)}",
          f"--config.train.micro_batch_size={row.micro_batch}",
          f"--config.train.gradient_accumulation_steps={row.accumulation}"]


def maxtext_args(row: Row, topology_name: str, output_dir: str) -> list[str]:
  """MaxText's key=value settings for the same step (after its base.yml)."""
  m = llama_model()
  settings = dict(
      run_name="benchmark_memory", base_output_directory=output_dir, dataset_type="synthetic",
      enable_checkpointing="false", compile_topology=MAXTEXT_TOPOLOGY[topology_name],
      compile_topology_num_slices=1, ici_fsdp_parallelism=-1, decoder_block="llama2", base_emb_dim=m.d_model,
      base_num_query_heads=m.num_heads, base_num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
      base_mlp_dim=m.mlp_dim, base_num_decoder_layers=row.layers, vocab_size=m.vocab_size,
      logits_via_embedding=str(m.tie_embeddings).lower(),
      max_target_length=row.seq_len, per_device_batch_size=row.micro_batch,  # MaxText's micro-batch per chip
      gradient_accumulation_steps=row.accumulation, dtype="bfloat16", weight_dtype="float32",
      remat_policy="minimal", attention=MAXTEXT_ATTENTION[row.attention], scan_layers="true", opt_type="adamw")
  return [f"{k}={v}" for k, v in settings.items()]


_PLAN_LINE = re.compile(r"^\s+(temporary|total)\s+([\d.]+)\s", re.M)
_STATS = re.compile(r"\b(argument|output|alias|temp)_size_in_bytes=(\d+)")  # \b: not the host_* sizes


def parse_plan(text: str) -> Memory:
  found = dict((k, float(v)) for k, v in _PLAN_LINE.findall(text))
  if set(found) != {"temporary", "total"}:
    raise ValueError(f"scripts/plan.py printed no memory:\n{text[-3000:]}")
  if "Collectives: none compiled" in text:  # XLA:TPU refused it (over the chip's HBM): plan.py's estimate
    raise ValueError(f"XLA:TPU did not compile the step (more than the chip's HBM): no measured figure.\n"
                     f"{text[-3000:]}")
  return Memory(temporary=found["temporary"], total=found["total"])


def parse_maxtext(text: str) -> Memory:
  """The `Memory analysis: CompiledMemoryStats(...)` line train_compile prints (device sizes, not host_*)."""
  line = next((l for l in text.splitlines() if l.startswith("Memory analysis:")), None)
  if line is None:
    raise ValueError(f"MaxText's train_compile printed no memory analysis:\n{text[-3000:]}")
  sizes = {k: int(v) for k, v in _STATS.findall(line)}
  if set(sizes) != {"argument", "output", "alias", "temp"}:
    raise ValueError(f"MaxText's memory analysis lacks sizes: {line}")
  total = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
  return Memory(temporary=sizes["temp"] / 1e9, total=total / 1e9)


def run(command: list[str], env: dict[str, str] | None = None) -> str:
  done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
  if done.returncode:
    raise RuntimeError(f"{' '.join(command[:3])} ... failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
  return done.stdout + done.stderr


def maxtext_installed() -> bool:
  """.venv-maxtext made from the current lock (install_maxtext.sh writes the lock's digest last, as
  scripts/find_python.sh's lock_digest: the sha256 of the file)."""
  with open(MAXTEXT_LOCK, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  try:
    with open(MAXTEXT_INSTALLED) as f:
      return f.read().strip() == digest
  except FileNotFoundError:
    return False


@functools.cache
def maxtext_base_config() -> str:
  """MaxText's base.yml, in its installed package."""
  return run([MAXTEXT_PYTHON, "-c", "import importlib.util, os; print(os.path.join(importlib.util.find_spec("
              "'maxtext').submodule_search_locations[0], 'configs', 'base.yml'))"]).strip().splitlines()[-1]


def maxtext_memory(row: Row, topology_name: str) -> Memory:
  """MaxText's own AOT compile of the row, with the planner's libtpu."""
  env = {"TPU_LIBRARY_PATH": topology.library_path(), "TPU_SKIP_MDS_QUERY": "1",
         "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  with tempfile.TemporaryDirectory() as output_dir:
    return parse_maxtext(run([MAXTEXT_PYTHON, "-m", "maxtext.trainers.pre_train.train_compile", maxtext_base_config(),
                              *maxtext_args(row, topology_name, output_dir)], env))


def table(rows: list[str], results: dict[str, dict[str, Memory]], topology_name: str) -> list[str]:
  with_maxtext = any("maxtext" in r for r in results.values())
  head = ["row", "work", "attention", "project total", "project temporary"]
  head += ["MaxText total", "MaxText temporary", "project / MaxText"] if with_maxtext else []
  lines = [f"Memory per chip (GB) on {topology_name}, llama_1_36b's dimensions, FSDP, bf16 compute, f32 "
           "parameters, save_dots (MaxText: minimal):", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in rows:
    row, got = ROWS[name], results[name]
    attention = f"{row.attention} / {MAXTEXT_ATTENTION[row.attention]}" if with_maxtext else row.attention
    cells = [name, row.work, attention, *got["project"].cells()]
    if "maxtext" in got:
      cells += [*got["maxtext"].cells(), f"{got['project'].total / got['maxtext'].total:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def main(argv):
  del argv
  unknown = [r for r in _ROWS.value if r not in ROWS]
  if unknown:
    raise app.UsageError(f"--rows: {', '.join(unknown)} unknown; the rows are {', '.join(ROWS)}.")
  if topology.library_path() is None:
    sys.exit("benchmark_memory.py needs libtpu (XLA:TPU): run `bash scripts/install.sh` (Linux x86_64).")
  with_maxtext = _MAXTEXT.value and maxtext_installed()
  if _MAXTEXT.value and not with_maxtext:
    print(f"MaxText is not installed beside at {os.path.relpath(MAXTEXT_LOCK, ROOT)}'s versions: the project's "
          "figures alone. `bash scripts/install_maxtext.sh` installs it.", flush=True)
  results = {}
  for name in _ROWS.value:
    start = time.perf_counter()
    results[name] = {"project": parse_plan(run(project_command(ROWS[name], _SLICE.value)))}
    if with_maxtext:
      results[name]["maxtext"] = maxtext_memory(ROWS[name], _SLICE.value)
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
  print("\n".join(table(_ROWS.value, results, _SLICE.value)))


if __name__ == "__main__":
  app.run(main)
