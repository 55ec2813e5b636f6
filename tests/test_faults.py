"""Faults: kill -9 at any moment, SIGTERM preemption, NaN/Inf, a full disk, and twenty-odd bad inputs.

Every crash must resume from the newest complete checkpoint and then log the very losses (bit for bit) of
a run that was never stopped; every bad input must stop at startup with the key at fault and a fix,
without touching the checkpoints of an earlier run.
"""

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from lm.checkpoints import checkpoint
from lm.config import from_config_dict
from lm.errors import ConfigError, TrainingError
from lm.training import metrics
from lm.training.optimizer import make_optimizer
from lm.training.train import check_finite, train_and_evaluate
from tests.helpers import apply_overrides
from tests.test_train import MAIN_ENV, ROOT, TINY, corpus, main_command, run_main  # noqa: F401

STEPS = ["--config.train.num_train_steps=8", "--config.train.save_interval_steps=2",
         "--config.train.eval_interval_steps=8"]


def _checkpoints(workdir) -> list[str]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(os.listdir(directory), key=str) if os.path.isdir(directory) else []


def _complete(workdir) -> list[int]:
  return sorted(int(name) for name in _checkpoints(workdir) if name.isdigit())


def _logged(workdir) -> set[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  return set(metrics.read_jsonl(str(workdir))) if os.path.exists(path) else set()


def _start(workdir, data_dir, corpus_dir, *overrides):
  return subprocess.Popen(main_command(workdir, data_dir, corpus_dir, *STEPS, *overrides), cwd=ROOT, env=MAIN_ENV,
                          stderr=subprocess.PIPE, text=True)


def _wait(process, condition, what, timeout=300) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if process.poll() is not None:
      raise AssertionError(f"training ended before {what}: {process.stderr.read()[-2000:]}")
    time.sleep(0.002)
  raise AssertionError(f"no {what} within {timeout} s")


MID_SAVE = "kill -9 during an asynchronous save"
# Each fault: how to wait for its moment, and the signal sent then.
# (A kill during a step is a kill between saves: the one below lands in step 6, after the save of 4.)
FAULTS = {
    # The save of step 4 starts right after step 4 is logged; listing the directory is the last, quick
    # check before the kill.
    MID_SAVE: (
        lambda w: 4 in _logged(w) and any("tmp" in name for name in _checkpoints(w)), signal.SIGKILL),
    "kill -9 between saves": (lambda w: 5 in _logged(w) and 4 in _complete(w), signal.SIGKILL),
    "SIGTERM (preemption)": (lambda w: 3 in _logged(w), signal.SIGTERM),
}


def _straight(root, corpus, *overrides):
  """An uninterrupted run: its data directory and its logged figures."""
  result = run_main(root / "run", root / "data", corpus, *STEPS, *overrides)
  assert result.returncode == 0, result.stderr[-2000:]
  return root / "data", metrics.read_jsonl(str(root / "run")), metrics.read_jsonl(str(root / "run"), "eval")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
  return _straight(tmp_path_factory.mktemp("straight"), corpus)


# SIGTERM in the default suite; the two kills (about 50 s each) under -m slow.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n != "SIGTERM (preemption)" else n
                                  for n in FAULTS])
def test_every_fault_resumes_bit_identical(straight, corpus, tmp_path, name):
  _fault_and_resume(name, straight, corpus, tmp_path)


BATCH_INVARIANT = ["--config.train.batch_invariant=True", "--config.mesh.data=8", "--config.mesh.fsdp=1"]


@pytest.mark.slow  # two trainings, about 100 s
def test_kill_9_resumes_bit_identical_in_the_batch_invariant_mode(corpus, tmp_path):
  _fault_and_resume("kill -9 between saves", _straight(tmp_path / "straight", corpus, *BATCH_INVARIANT), corpus,
                    tmp_path, *BATCH_INVARIANT)


def _fault_and_resume(name, straight, corpus, tmp_path, *overrides) -> None:
  """Fault `name` strikes a run, which is then resumed: its losses must be the straight run's."""
  data_dir, expected, expected_eval = straight
  moment, sig = FAULTS[name]
  for attempt in range(3):  # a save lasts a fraction of a second: the kill may come too late
    workdir = str(tmp_path / f"run_{attempt}")
    process = _start(workdir, data_dir, corpus, *overrides)
    _wait(process, lambda: moment(workdir), name)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=300)
    # A kill meant to land mid-save must leave a partial checkpoint behind.
    if name != MID_SAVE or any("tmp" in n for n in _checkpoints(workdir)):
      break
  else:
    raise AssertionError(f"{name}: the save always finished before the kill: {_checkpoints(workdir)}")
  if sig == signal.SIGTERM:  # finishes the step, saves it, exits cleanly
    assert process.returncode == 0, stderr[-2000:]
    assert "Preempted: finished step" in stderr
  newest = _complete(workdir)[-1] if _complete(workdir) else None

  resumed = run_main(workdir, data_dir, corpus, *STEPS, *overrides)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert (f"resumed from step {newest}" if newest else "fresh start") in resumed.stderr, name
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [(r["step"], r["loss"]) for r in records if r["collection"] == "train"]
  assert {step for step, _ in train} == set(range(1, 9))
  for step, loss in train:  # steps logged twice (before the crash and after the resume) agree too
    assert loss == expected[step]["loss"], (name, step)
  # The loss EMA is saved with the state: the resumed run continues it as the straight run did.
  emas = [(r["step"], r["loss_ema"]) for r in records if r["collection"] == "train" and "loss_ema" in r]
  assert len(emas) >= 8
  for step, ema in emas:
    assert ema == expected[step]["loss_ema"], (name, step)
  assert metrics.read_jsonl(workdir, "eval")[8] == expected_eval[8]


def _config(tmp_path, corpus_dir, **train):
  c = apply_overrides(default.get_config(), TINY)
  c.data.data_dir = str(tmp_path / "data")
  c.data.sources.main.path = f"{corpus_dir}/*.py"
  c.data.sources.main.validation = f"{corpus_dir}/bisect.py"
  for name, value in train.items():
    c.train[name] = value
  return c


def test_nan_stops_with_the_step_and_saves_nothing_bad(tmp_path, corpus):
  config = from_config_dict(_config(tmp_path, corpus, learning_rate=1e30, num_train_steps=6,
                                    save_interval_steps=1, warmup_steps=0))
  with pytest.raises(TrainingError) as e:
    train_and_evaluate(config, str(tmp_path / "run"))
  message = str(e.value)
  bad_step = int(message.split(":")[0].removeprefix("Step "))
  assert "became" in message and "skip_nonfinite_updates" in message and bad_step >= 2
  assert _complete(tmp_path / "run") == list(range(1, bad_step))  # the bad step was never saved


def test_nonfinite_updates_are_skipped_and_counted_when_asked():
  from tests.test_train_step import _batch, _init, _train_cfg, micro_batches
  from tests.helpers import tiny_model
  from lm.model.decoder import Decoder
  from lm.training.train_step import train_step
  model = Decoder(tiny_model())
  tx = make_optimizer(dataclasses.replace(_train_cfg(2), skip_nonfinite_updates=True), 10)
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, accumulation_steps=2))
  state = _init(model, tx)
  poisoned = state.params["embedding"].at[7].set(jnp.inf)  # any batch holding token 7 goes non-finite
  state = state.replace(params={**state.params, "embedding": poisoned})
  clean = _batch(4, seed=1)
  clean["tokens"][clean["tokens"] == 7] = 8
  bad = {k: v.copy() for k, v in clean.items()}
  bad["tokens"][1, 2] = 7

  def optimizer_step(state, batch):
    return step(state, micro_batches(batch, 2))

  before = state.params["lm_head"]
  state, m = optimizer_step(state, bad)
  assert int(m["skipped_updates"]) == 1 and not np.isfinite(float(m["grad_norm"]))
  np.testing.assert_array_equal(state.params["lm_head"], before)  # skipped: nothing moved
  assert int(state.step) == 1  # but the step was consumed with exactly its own micro-batches
  state, m = optimizer_step(state, clean)
  assert int(m["skipped_updates"]) == 1 and np.isfinite(float(m["grad_norm"]))
  assert not np.array_equal(state.params["lm_head"], before)


def _tmpfs(path, size: str) -> bool:
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


def test_full_disk_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, corpus):
  disk = tmp_path / "small_disk"
  if not _tmpfs(disk, "3m"):
    pytest.skip("cannot mount a small tmpfs here (needs root)")
  try:
    config = from_config_dict(_config(tmp_path, corpus, num_train_steps=8, save_interval_steps=1,
                                      checkpoint_dir=str(disk / "ckpt"), max_to_keep=5))
    with pytest.raises(TrainingError, match="Saving the checkpoint of step .* failed") as e:
      train_and_evaluate(config, str(tmp_path / "run"))
    assert "Free disk space" in str(e.value)
    complete = sorted(int(n) for n in os.listdir(disk / "ckpt") if n.isdigit())
    assert complete, "at least one checkpoint fitted"
    state = checkpoint.restore_on_one_device(str(disk / "ckpt" / str(complete[-1]) / "state"))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  finally:
    subprocess.run(["umount", str(disk)], capture_output=True)


def _files(directory) -> dict[str, str]:
  """Every file under a directory with the hash of its bytes."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, corpus):
  """A workdir holding the checkpoints of an earlier run, which no mistake below may touch."""
  root = tmp_path_factory.mktemp("earlier")
  config = from_config_dict(_config(root, corpus, num_train_steps=2))
  train_and_evaluate(config, str(root / "run"))
  return root


MISTAKES = [  # (overrides of the tiny config, what the message must say)
    ({"model.num_kv_heads": 3}, "config.model.num_heads = 4 is not divisible by config.model.num_kv_heads = 3"),
    ({"model.head_dim": 15}, "config.model.head_dim = 15 must be even"),
    ({"model.name": "gpt5"}, "config.model.name = 'gpt5' is not known"),
    ({"model.dtype": "float16"}, "config.model.dtype = 'float16' is not known"),
    ({"model.remat": "some"}, "config.model.remat = 'some' is not known"),
    ({"train.optimizer": "sgd"}, "config.train.optimizer = 'sgd' is not known"),
    ({"train.schedule": "step"}, "config.train.schedule = 'step' is not known"),
    ({"train.seq_len": 128}, "config.train.seq_len = 128 is over config.model.max_seq_len = 64"),
    ({"train.micro_batch_size": 0}, "config.train.micro_batch_size = 0 must be > 0"),
    ({"train.gradient_accumulation_steps": -2}, "config.train.gradient_accumulation_steps = -2 must be > 0"),
    ({"train.save_interval_steps": 0}, "config.train.save_interval_steps = 0 must be > 0"),
    ({"train.eval_interval_steps": -1}, "config.train.eval_interval_steps = -1 must be > 0"),
    ({"train.num_epochs": 2}, "set exactly one of them"),
    ({"train.warmup_steps": 5}, "config.train.warmup_steps = 5 is not below config.train.num_train_steps = 2"),
    ({"train.learning_rate": "fast"}, "config.train.learning_rate = 'fast' is a str; it must be a float"),
    ({"train.max_grad_norm": -1.0}, "config.train.max_grad_norm = -1.0 must be >= 0"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "at most one may be -1"),
    ({"mesh.data": 16}, "needs 32 devices but 8 are present"),
    ({"mesh.data": -1, "mesh.tensor": 3}, "config.mesh.data = -1 cannot fill 8 devices"),
    ({"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 8}, "config.model.num_heads = 4 does not split over config.mesh.tensor = 8"),
    ({"train.batch_invariant": True, "mesh.data": 2, "mesh.fsdp": 4},
     "config.train.batch_invariant needs a data-parallel mesh, but mesh.fsdp = 4 and mesh.tensor = 1"),
    ({"train.batch_invariant": True, "train.deterministic": False, "mesh.data": -1, "mesh.fsdp": 1},
     "config.train.batch_invariant needs config.train.deterministic = True"),
    ({"train.batch_invariant": True, "train.batch_invariant_rows": 3, "mesh.data": -1, "mesh.fsdp": 1},
     "config.train.batch_invariant_rows = 3 must be a positive divisor of config.train.micro_batch_size"),
    ({"data.sources.main.kind": "tfds", "data.sources.main.path": "no_such_dataset"},
     "config.data.sources.main.path = 'no_such_dataset' is not a registered TFDS dataset"),
    ({"data.sources.main.path": "/nonexistent/*.txt"}, "config.data.sources.main.path = '/nonexistent/*.txt'"),
    ({"data.sources.main.path": "EMPTY"}, "the corpus is empty"),
    ({"data.eval_split": "test"}, "config.data.eval_split = 'test' is not known; choose one of validation, train"),
    ({"data.sources.main.weight": -1.0}, "config.data.sources.main.weight = -1.0 must be a finite number >= 0"),
    ({"data.sources.main.weight": 0.0}, "every weight is 0"),
    ({"data.sources.main.kind": "jsonl"}, "has a line that is not JSON"),
    ({"data.tokenizer": "sentencepiece", "data.tokenizer_path": "/nonexistent/spm.model"}, "config.data.tokenizer_path = '/nonexistent/spm.model' cannot be read"),
    ({"model.vocab_size": 200}, "has 259 ids but config.model.vocab_size = 200; raise model.vocab_size to at least 259"),
    ({"train.micro_batch_size": 4096}, "fewer than one global batch"),
    ({"model.d_model": 96}, "holds a checkpoint (step 2) of another model or optimizer: model.d_model = 64 there, 96 here"),
    ({"train.optimizer": "lion"}, "of another model or optimizer: train.optimizer = 'adamw' there, 'lion' here"),
    ({"train.unknown_key": 1}, "unknown keys ['unknown_key']"),
    ({"model.rope_theta": float("inf")}, "config.model.rope_theta = inf is not a finite number"),
    ({"train.learning_rate": float("nan")}, "config.train.learning_rate = nan is not a finite number"),
    # Resumed with other data than the checkpoint's run: refused (train.allow_data_change does it on purpose).
    ({"train.seed": 7}, "holds step 2 of a run with other data: train.seed = 0 there, 7 here"),
    ({"train.seq_len": 32}, "of a run with other data: train.seq_len = 64 there, 32 here"),
    ({"data.sources.main.max_documents": 5}, "of a run with other data: data.sources = [{"),
    ({"train.num_train_steps": 1, "train.warmup_steps": 0}, "holds step 2, past config.train.num_train_steps = 1"),
    ({"train.init_from": "/nonexistent/params"}, "/nonexistent/params does not exist"),
    ({"train.init_from": "A_FILE"}, "a_file is a file, not a directory: name a directory written by "
                                    "scripts/convert_hf.py import (holding model.json and params/) or a run's "
                                    "checkpoint directory"),
    ({"data.data_dir": "A_FILE"}, "a_file' is a file, not a directory. It holds the trained tokenizers and the "
                                  "prepared token shards: name a directory"),
    ({"data.sources.main.path": "BINARY"}, "binary.py is binary, not text: it holds NUL bytes"),
    ({"model.init_std": 1e30}, "config.model.init_std = 1e+30 is over 1: every weight is drawn with this "
                               "standard deviation"),
    # The earlier run's parameters, for a model with another RoPE base.
    ({"train.init_from": "EARLIER", "model.rope_theta": 5e5},
     "holds parameters of another model: model.rope_theta = 10000.0 there, 500000.0 here"),
]


@pytest.mark.parametrize("overrides,message", MISTAKES, ids=[" ".join(map(str, m[0].items())) for m in MISTAKES])
def test_mistakes_stop_at_startup_and_touch_nothing(earlier_run, corpus, tmp_path, overrides, message):
  before = _files(earlier_run / "run")
  # A plain dict: no type safety, as in a hand-written config. Two steps, as the earlier run: a mistake
  # that slipped through would resume that run (and fail the check below) rather than train for long.
  d = _config(earlier_run, corpus, num_train_steps=2).to_dict()
  for key, value in overrides.items():
    *sections, name = key.split(".")
    functools.reduce(lambda part, section: part[section], sections, d)[name] = _made(value, tmp_path, earlier_run)
  # A vocabulary change is caught first as "another model" in the earlier workdir, a data change as "other
  # data" (but for the entry that tests that), and parameters to start from are used only on a fresh start:
  # try them on a new one.
  fresh = ("model.vocab_size" in overrides or "train.init_from" in overrides
           or (any(key.startswith("data.") for key in overrides) and "other data" not in message))
  workdir = tmp_path / "new" if fresh else earlier_run / "run"
  with pytest.raises(ConfigError) as e:
    train_and_evaluate(from_config_dict(ml_collections.ConfigDict(d)), str(workdir))
  assert message in str(e.value)
  assert "\n" not in str(e.value)  # one paragraph
  assert _files(earlier_run / "run") == before


def _made(value, tmp_path, earlier_run):
  """The value of a MISTAKES override, with the files its placeholder names made under tmp_path."""
  if value == "EMPTY":  # a corpus of empty files
    (tmp_path / "empty").mkdir()
    for i in range(3):
      (tmp_path / "empty" / f"{i}.py").write_text("")
    return f"{tmp_path}/empty/*.py"
  if value == "BINARY":  # a corpus with a binary file
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "text.py").write_text("print('text')\n" * 100)
    (tmp_path / "binary" / "binary.py").write_bytes(bytes(range(256)) * 8)
    return f"{tmp_path}/binary/*.py"
  if value == "A_FILE":
    (tmp_path / "a_file").write_text("a file, not a directory")
    return str(tmp_path / "a_file")
  if value == "EARLIER":
    return str(earlier_run / "run" / "checkpoints")
  return value


def test_a_mistake_in_the_data_stops_before_the_checkpoint_manager_starts(corpus, tmp_path, monkeypatch):
  # orbax's writing manager starts a thread at once (it removes a killed save's temporary directories); a
  # process exiting right after cut it off with a traceback under the one-line message.
  made = []
  monkeypatch.setattr(checkpoint, "make_manager", lambda *args: made.append(args))
  c = _config(tmp_path, corpus, num_train_steps=2)
  c.data.sources.main.path = str(tmp_path / "none" / "*.txt")
  with pytest.raises(ConfigError, match="matches no file"):
    train_and_evaluate(from_config_dict(c), str(tmp_path / "run"))
  assert made == []


def test_a_non_finite_first_step_blames_the_initial_parameters_not_the_learning_rate():
  nan = {"loss": float("nan"), "grad_norm": float("nan"), "skipped_updates": 0}
  with pytest.raises(TrainingError) as first:
    check_finite(False, 1, nan)
  assert str(first.value).startswith("Step 1: the loss and the grad norm became nan")
  assert ("computed on the initial parameters, before any update, so the learning rate played no part: check "
          "config.model.init_std (0.02 is usual) or the parameters of config.train.init_from, config.model.dtype, "
          "and the data.") in str(first.value)
  with pytest.raises(TrainingError) as later:
    check_finite(False, 2, nan)
  assert "Lower config.train.learning_rate" in str(later.value) and "init_std" not in str(later.value)


def test_loading_never_unpickles():
  sources = {}
  for path, _, names in os.walk(os.path.join(ROOT, "lm")):
    for name in (n for n in names if n.endswith(".py")):
      with open(os.path.join(path, name)) as f:
        sources[os.path.relpath(os.path.join(path, name), ROOT)] = f.read()
  assert len(sources) > 40
  assert not [n for n, s in sources.items() if "import pickle" in s or "allow_pickle=True" in s]
  assert not [n for n, s in sources.items() if "np.load(" in s and "allow_pickle=False" not in s]


def test_ctrl_c_finishes_the_step_saves_it_and_exits_130(tmp_path, corpus):
  workdir = str(tmp_path / "run")
  process = _start(workdir, tmp_path / "data", corpus)
  _wait(process, lambda: 3 in _logged(workdir), "step 3")
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 130, stderr[-2000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  line = next(line for line in stderr.splitlines() if line.startswith("Interrupted (Ctrl-C): finished step"))
  step = int(line.split("finished step ")[1].split()[0])
  assert step >= 3 and _complete(workdir)[-1] == step  # that very step is saved, complete


@pytest.mark.slow  # 26 s; the first Ctrl-C and one at start-up are in the default suite
def test_a_second_ctrl_c_exits_at_once(tmp_path, corpus):
  workdir = str(tmp_path / "run")
  process = _start(workdir, tmp_path / "data", corpus)
  _wait(process, lambda: 2 in _logged(workdir), "step 2")
  process.send_signal(signal.SIGINT)
  time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == -signal.SIGINT, stderr[-2000:]
  assert "Traceback" not in stderr


def test_ctrl_c_during_start_up_exits_within_a_second(tmp_path, corpus):
  process = _start(str(tmp_path / "run"), tmp_path / "data", corpus)
  time.sleep(4)  # importing, preparing or compiling: no step yet
  assert process.poll() is None
  sent = time.time()
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  assert time.time() - sent < 1.0 and process.returncode == -signal.SIGINT, stderr[-2000:]
  assert "Traceback" not in stderr


def _truncate_data(step_dir):
  for root, _, names in os.walk(os.path.join(step_dir, "state", "ocdbt.process_0", "d")):
    for name in names:
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)


def _damage_metadata(step_dir):
  with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
    f.write("{not json")


def _flip_a_bit(step_dir):
  """One bit of the largest array data file: orbax would restore it as another number."""
  data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  path = max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes([byte ^ 4]))


DAMAGE = {"one flipped bit": _flip_a_bit, "truncated data files": _truncate_data,
          "damaged _METADATA": _damage_metadata,
          "no config": lambda step_dir: shutil.rmtree(os.path.join(step_dir, "config")),
          "no state": lambda step_dir: shutil.rmtree(os.path.join(step_dir, "state"))}


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, corpus):
  """A run of 6 steps as it was after the save of step 4 (saved at 2 and 4), and its losses."""
  root = tmp_path_factory.mktemp("four")
  train_and_evaluate(from_config_dict(_config(root, corpus, num_train_steps=6)), str(root / "run"))
  shutil.rmtree(root / "run" / "checkpoints" / "6")
  return root, metrics.read_jsonl(str(root / "run"))


# A flipped bit (the checksums) in the default suite, the rest under -m slow.
SLOW_DAMAGE = {"truncated data files", "damaged _METADATA", "no state", "no config"}


@pytest.mark.parametrize("damage", [pytest.param(d, marks=pytest.mark.slow) if d in SLOW_DAMAGE else d
                                    for d in DAMAGE])
def test_training_falls_back_from_an_unreadable_newest_checkpoint(four_steps, corpus, tmp_path, damage):
  root, straight = four_steps
  workdir = tmp_path / "run"
  shutil.copytree(root / "run", workdir)
  DAMAGE[damage](str(workdir / "checkpoints" / "4"))
  last = train_and_evaluate(from_config_dict(_config(root, corpus, num_train_steps=6)), str(workdir))
  assert last["step"] == 6
  names = os.listdir(workdir / "checkpoints")
  assert any(name.startswith("4.unreadable-") for name in names), names  # set aside, not deleted
  assert _complete(workdir)[-1] == 6
  logged = [(r["step"], r["loss"]) for r in map(json.loads, open(workdir / "metrics.jsonl"))
            if r["collection"] == "train"]
  assert [step for step, _ in logged[-4:]] == [3, 4, 5, 6]  # resumed from step 2
  for step, loss in logged[-4:]:  # steps 3 and 4 trained again: the very losses of the first time
    assert loss == straight[step]["loss"], (damage, step)


def test_every_flipped_bit_is_detected(four_steps):
  root, _ = four_steps
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "corrupt_checkpoint.py"),
                           f"--checkpoint_dir={root / 'run' / 'checkpoints'}", "--flips=40"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert "corruptions: 40 tried, 40 detected, 0 accepted" in result.stdout
  assert checkpoint.verify(root / "run" / "checkpoints", 4) is None  # every flip undone


def test_no_readable_checkpoint_stops_with_what_was_found(four_steps, corpus, tmp_path):
  root, _ = four_steps
  workdir = tmp_path / "run"
  shutil.copytree(root / "run", workdir)
  for step in ("2", "4"):
    _truncate_data(str(workdir / "checkpoints" / step))
  with pytest.raises(TrainingError) as e:
    train_and_evaluate(from_config_dict(_config(root, corpus, num_train_steps=6)), str(workdir))
  assert "can be read: step 4:" in str(e.value) and "step 2:" in str(e.value)
  assert "Nothing was deleted" in str(e.value)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # nothing moved or deleted


def _lease(host, pid, age=0.0):
  return json.dumps({"host": host, "pid": pid, "started": "2026-11-29 10:00:00 UTC", "token": "other",
                     "heartbeat": time.time() - age})


def test_a_second_training_on_a_workdir_stops_naming_the_first(earlier_run, corpus, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "lease.json").write_text(_lease(socket.gethostname(), os.getpid()))  # a live process
  config = from_config_dict(_config(earlier_run, corpus, num_train_steps=2))
  with pytest.raises(ConfigError) as e:
    train_and_evaluate(config, str(workdir))
  assert f"in use by another training: host {socket.gethostname()}, pid {os.getpid()}" in str(e.value)
  assert sorted(os.listdir(workdir)) == ["lease.json"]  # nothing written
  # A live lease of another host, whose heartbeat is recent, stops it too; an old heartbeat is taken over.
  (workdir / "lease.json").write_text(_lease("elsewhere", 1, age=10))
  with pytest.raises(ConfigError, match="host elsewhere, pid 1"):
    train_and_evaluate(config, str(workdir))


@pytest.mark.parametrize("holder", ["a process that is gone", "a host gone quiet"])
def test_a_stale_lease_is_taken_over_and_released_at_the_end(tmp_path, holder):
  from lm.checkpoints import lease
  finished = subprocess.Popen(["true"])
  finished.wait()  # its pid no longer runs
  stale = (_lease(socket.gethostname(), finished.pid) if holder == "a process that is gone"
           else _lease("elsewhere", 1, age=lease.STALE_SECONDS + 1))
  (tmp_path / "lease.json").write_text(stale)
  with lease.Lease(str(tmp_path)) as held:
    held.confirm()
    assert json.loads((tmp_path / "lease.json").read_text())["pid"] == os.getpid()
  assert not (tmp_path / "lease.json").exists()


@pytest.mark.parametrize("command,message", [
    (["main.py", "--config=configs/default.py", "--workdir="], "--workdir is empty"),
    (["main.py", "--config=configs/nope.py", "--workdir=runs/x"],
     f"Configuration error: --config=configs/nope.py: {ROOT}/configs/nope.py does not exist"),
    (["main.py", "--config={tmp}/syntax.py", "--workdir=runs/x"],
     "Configuration error: --config={tmp}/syntax.py: {tmp}/syntax.py is not valid Python: line 3: invalid syntax"),
    (["main.py", "--config={tmp}/no_get_config.py", "--workdir=runs/x"],
     "Configuration error: --config={tmp}/no_get_config.py: {tmp}/no_get_config.py defines no get_config()"),
    (["main.py", "--config=configs/default.py", "--workdir=runs/x", "--config.foo.bar=1"],
     "Configuration error: --config.foo.bar: config of configs/default.py has no key 'foo'; its keys are "
     f"{', '.join(sorted(default.get_config().keys()))}."),
    (["main.py", "--config=configs/default.py", "--workdir=runs/x", "--config.train.seq_lenn=64"],
     "Configuration error: --config.train.seq_lenn: config.train of configs/default.py has no key 'seq_lenn'. "
     "Did you mean --config.train.seq_len"),
    (["scripts/prepare_data.py", "--config=configs/default.py", "--config.data.tokenizerr=byte"],
     "Configuration error: --config.data.tokenizerr: config.data of configs/default.py has no key 'tokenizerr'"),
    (["scripts/sample.py", "--config=configs/default.py", "--workdir=runs/x", "--max_tokens=0"],
     "--max_tokens"),
    (["scripts/sample.py", "--config=configs/default.py", "--workdir=runs/x", "--num_samples=0"],
     "--num_samples"),
    # Bytes that are not UTF-8 reach Python as surrogate escapes ($'\xff\xfe' in bash).
    (["scripts/sample.py", "--config=configs/default.py", "--workdir=runs/x", "--prompt=ab\udcff\udcfe"],
     "Error: --prompt holds bytes that are not UTF-8 (b'\\xff\\xfe' at character 2): the shell passed text in "
     "another encoding, or binary data. Pass the prompt as UTF-8 text"),
    (["scripts/plan.py", "--config=configs/default.py", "--devices=0"],
     "flag --devices=0: 0 is not a positive integer"),
    (["scripts/plan.py", "--config=configs/default.py", "--mfu=1.5"], "--mfu is a fraction of the peak FLOP/s"),
])
def test_bad_flags_get_a_message_not_a_traceback(command, message, tmp_path):
  (tmp_path / "syntax.py").write_text("from configs import base\n\ndef get_config(:\n  return base.get_config()\n")
  (tmp_path / "no_get_config.py").write_text("from configs import base\n\nc = base.get_config()\n")
  command = [arg.replace("{tmp}", str(tmp_path)) for arg in command]
  message = message.replace("{tmp}", str(tmp_path))
  result = subprocess.run([sys.executable, *command], cwd=ROOT, env=MAIN_ENV, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
  assert result.returncode == 2 or "Configuration error" not in message
  assert result.returncode == 2 or "Error: " not in message
  assert "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(ROOT, "checkpoints"))
