"""lm/training/wandb_writer.py in wandb's offline mode: no network, no account. The logged values are read back from
the run's `.wandb` file (offline runs write no `wandb-summary.json`)."""

import ast
import glob
import json
import os
import struct

import numpy as np
import pytest
import wandb  # the test extra installs it: a missing one is an install failure, not a skip

from lm.training import wandb_writer

MODULE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lm", "training", "wandb_writer.py")


@pytest.fixture
def offline(tmp_path, monkeypatch):
  """wandb offline and quiet, its caches under tmp_path; wandb's process-wide state reset before and after
  (it reads the environment once, at its first init in a process)."""
  env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
         "WANDB_DISABLE_CODE": "true", "WANDB__DISABLE_STATS": "true"}
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
  for name in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
    monkeypatch.delenv(name, raising=False)
  wandb.teardown()
  yield tmp_path
  wandb.teardown()


def _records(path):
  """The protobuf records of a `.wandb` file: a LevelDB-style log (a 7-byte `:W&B` header, then 32 KiB
  blocks of records, each with a 7-byte header: crc32c, length, type full/first/middle/last)."""
  from wandb.proto import wandb_internal_pb2

  with open(path, "rb") as f:
    data = f.read()
  assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), "unknown .wandb file format"
  pos, pending = 7, b""
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # block trailer too short for a header: padding
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # full, last
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      yield record


def _history(run_dir):
  """{step: {key: value}} of the user's keys (not wandb's own `_step`, `_runtime`, ...), and the run record."""
  (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
  history, run = {}, None
  for record in _records(path):
    if record.HasField("run"):
      run = record.run
    if record.HasField("history"):
      row = history.setdefault(record.history.step.num, {})
      for item in record.history.item:
        key = item.key or "/".join(item.nested_key)
        if not key.startswith("_"):
          row[key] = json.loads(item.value_json)
  return history, run


def _write(workdir, steps):
  train, eval_ = wandb_writer.create("lm-test", str(workdir), {"train": {"seed": 0, "wandb_project": "lm-test"}})
  for step in steps:
    # The types the training loop hands over: Python floats, numpy and 0-d arrays.
    train.write_scalars(step, {"loss": 1.5 / step, "tokens_seen": np.int64(1024 * step)})
    eval_.write_scalars(step, {"loss": np.asarray(2.5 / step, np.float32)})
  run = train.run
  train.flush()
  train.close()
  eval_.close()
  _wait_for_files()
  return run


def _wait_for_files():
  # Offline, run.finish() can return before wandb's service process has written the history to the .wandb
  # file (seen in 4 of 40 runs on a loaded machine); teardown, which wandb's atexit hook also calls, waits.
  wandb.teardown()


def test_offline_run_under_the_workdir_holds_the_scalars(offline):
  workdir = offline / "runs" / "small"
  run = _write(workdir, steps=(1, 2))
  (run_dir,) = glob.glob(str(workdir / "wandb" / "offline-run-*"))
  assert run_dir.endswith(f"-{wandb_writer.run_id(str(workdir))}")
  history, record = _history(run_dir)
  assert history == {
      1: {"train/loss": 1.5, "train/tokens_seen": 1024, "eval/loss": 2.5},
      2: {"train/loss": 0.75, "train/tokens_seen": 2048, "eval/loss": 1.25},
  }
  assert (record.run_id, record.display_name, record.project) == (run.id, "small", "lm-test")
  config = {item.key: json.loads(item.value_json) for item in record.config.update}
  assert config["train"] == {"seed": 0, "wandb_project": "lm-test"}


def test_a_resumed_training_continues_the_same_run(offline):
  workdir = offline / "run"
  first = _write(workdir, steps=(1,))
  second = _write(str(workdir) + "/", steps=(2,))  # same directory, spelled differently
  other = _write(offline / "other", steps=(1,))
  assert first.id == second.id == wandb_writer.run_id(str(workdir)) != other.id
  run_dirs = sorted(glob.glob(str(workdir / "wandb" / "offline-run-*")))
  assert len(run_dirs) == 2  # one per process lifetime of the run; `wandb sync` uploads both, in order
  assert [sorted(_history(d)[0]) for d in run_dirs] == [[1], [2]]


def test_close_of_one_writer_leaves_the_run_open_for_the_other(offline):
  train, eval_ = wandb_writer.create("lm-test", str(offline / "run"), {})
  train.close()
  train.close()  # twice is harmless
  eval_.write_scalars(3, {"loss": 1.0})
  eval_.close()
  _wait_for_files()
  (run_dir,) = glob.glob(str(offline / "run" / "wandb" / "offline-run-*"))
  assert _history(run_dir)[0] == {3: {"eval/loss": 1.0}}


def test_wandb_is_imported_only_when_a_writer_is_created():
  # Static, because another test in the process may already have imported wandb.
  tree = ast.parse(open(MODULE).read())
  top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
  names = [alias.name for node in top_level for alias in node.names] + [
      node.module for node in top_level if isinstance(node, ast.ImportFrom)]
  assert not [name for name in names if name and name.split(".")[0] == "wandb"]
