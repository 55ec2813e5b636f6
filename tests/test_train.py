"""End to end through main.py: train with accumulation on 8 devices, checkpoint, resume; bad input."""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import tensorflow as tf

from tests.helpers import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]
CORPUS = ["textwrap.py", "csv.py", "shlex.py", "fractions.py", "bisect.py", "heapq.py", "string.py",
          "random.py", "argparse.py", "ast.py"]

TINY = [
    "--config.model.vocab_size=320", "--config.model.d_model=64", "--config.model.num_layers=2",
    "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
    "--config.model.mlp_dim=128", "--config.model.max_seq_len=64", "--config.train.seq_len=64",
    "--config.data.tokenizer=byte", "--config.data.eval_sequences=16",
    "--config.train.micro_batch_size=2", "--config.train.gradient_accumulation_steps=2",
    "--config.train.warmup_steps=1", "--config.train.save_interval_steps=2",
    "--config.train.eval_interval_steps=2", "--config.train.log_interval_steps=1",
    "--config.mesh.data=4", "--config.mesh.fsdp=2",
    "--config.model.scan_layers=True",  # the full-size configs' layout (configs/default.py unrolls its 4)
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  directory = tmp_path_factory.mktemp("corpus")
  for name in CORPUS:
    shutil.copy(os.path.join(STDLIB, name), directory)
  return directory


MAIN_ENV = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}",
                TF_CPP_MIN_LOG_LEVEL="2")


def main_command(workdir, data_dir, corpus, *overrides) -> list[str]:
  """main.py on the tiny config and corpus, 8 simulated devices (MAIN_ENV)."""
  return [sys.executable, os.path.join(ROOT, "main.py"), f"--config={ROOT}/configs/default.py",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          f"--config.data.sources.main.path={corpus}/*.py",
          f"--config.data.sources.main.validation={corpus}/bisect.py", *TINY, *overrides]


def run_main(workdir, data_dir, corpus, *overrides, cwd=ROOT):
  return subprocess.run(main_command(workdir, data_dir, corpus, *overrides), cwd=cwd, env=MAIN_ENV,
                        capture_output=True, text=True, timeout=600)


def scalars(logdir):
  """{tag: {step: value}} from the TensorBoard event files under logdir."""
  out = {}
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def test_train_checkpoint_and_resume(tmp_path, corpus):
  workdir, data_dir = tmp_path / "run", tmp_path / "data"
  # A relative workdir, as users type it (orbax itself needs absolute paths).
  first = run_main("run", data_dir, corpus, "--config.train.num_train_steps=4", cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  log = first.stderr
  for line in ("Mesh:                 data=4 x fsdp=2 x tensor=1",
               "Micro batch:          2 sequences per device",
               "Gradient accum steps: 2 per device | 16 global",
               "Effective batch:      2 x 2 x 8 = 32 sequences = 2,048 tokens",
               "FLOPs per token:", "Peak FLOP/s:", "per device, for MFU", "fresh start",
               "Devices:              8 x", "Determinism:", "--xla_gpu_deterministic_ops=true"):
    assert line in log, line
  # One console line per logged step, eval lines marked; library INFO chatter (orbax) stays off.
  assert "step 4/4 | loss" in log and ">>> eval  step 4: loss" in log
  chatter = [line for line in log.splitlines() if re.match(r"I\d{4} ", line)]
  assert not chatter, chatter[:5]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]

  train = scalars(workdir / "train")
  assert sorted(train["loss"]) == [1, 2, 3, 4]
  assert sorted(train["mfu"]) == [2, 3, 4]  # step 1 carries compilation and is not timed
  assert all(0 < v < 1 for v in train["mfu"].values())
  assert train["loss"][4] < train["loss"][1]
  assert sorted(scalars(workdir / "eval")["loss"]) == [2, 4]

  second = run_main("run", data_dir, corpus, "--config.train.num_train_steps=6", cwd=tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from step 4" in second.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
  resumed = scalars(workdir / "train")
  assert sorted(resumed["loss"]) == [1, 2, 3, 4, 5, 6]


# The messages of every startup mistake are checked in-process (tests/test_faults.py, MISTAKES); these two
# show what main.py makes of them: exit code 2, the message, no traceback.
@pytest.mark.parametrize("override,message", [
    ("--config.model.num_kv_heads=3", "config.model.num_heads = 4 is not divisible by config.model.num_kv_heads = 3"),
    ("--config.mesh.data=16", "config.mesh = {'data': 16, 'fsdp': 2, 'tensor': 1} needs 32 devices but 8 are present"),
])
def test_bad_config_stops_at_startup_with_the_key(tmp_path, corpus, override, message):
  result = run_main(tmp_path / "run", tmp_path / "data", corpus, *override.split())
  assert result.returncode == 2
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")


def test_unwritable_workdir_is_a_config_error(tmp_path, corpus):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  result = run_main(blocker / "run", tmp_path / "data", corpus)
  assert result.returncode == 2 and "--workdir" in result.stderr and "cannot be written" in result.stderr


def test_misspelled_override_fails():
  result = subprocess.run([sys.executable, "main.py", "--config=configs/default.py", "--workdir=/tmp/x",
                           "--config.train.micro_batchsize=2"], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode != 0 and "micro_batchsize" in result.stderr
