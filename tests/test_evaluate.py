"""`main.py --mode=eval` and scripts/sample.py on a run trained by main.py, and their bad input."""

import dataclasses
import math
import os
import shutil
import subprocess
import sys
import threading
import time

import jax
import pytest

from lm import console
from lm.checkpoints import checkpoint
from lm.config import Config, from_config_dict, to_dict
from lm.errors import ConfigError, TrainingError
from lm.model import sharding
from lm.training import evaluate, metrics, runtime
from lm.training.optimizer import make_optimizer
from tests.helpers import apply_overrides
from tests.test_train import MAIN_ENV, ROOT, main_command

TEXT = "0123456789abcdefghijklmnopqrstuvwxyz\n" * 400  # each character decides the next one
STEPS = 24  # enough for the tiny model to learn the cycle


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run of 24 steps on 8 devices (data 4 x fsdp 2, accumulation 2) on a repetitive corpus: checkpoints
  at 12 and 24 with their in-training eval losses."""
  root = tmp_path_factory.mktemp("eval_run")
  corpus = root / "corpus"
  corpus.mkdir()
  for name in ("a.txt", "b.txt", "c.txt"):
    (corpus / name).write_text(TEXT)
  overrides = [f"--config.train.num_train_steps={STEPS}", "--config.train.save_interval_steps=12",
               "--config.train.eval_interval_steps=12", "--config.train.log_interval_steps=12",
               "--config.data.sources.main.path=" + str(corpus / "*.txt"), "--config.data.sources.main.validation=" + str(corpus / "c.txt"),
               "--config.data.eval_sequences=8"]
  command = main_command(root / "run", root / "data", corpus, *overrides)
  result = subprocess.run(command, cwd=ROOT, env=MAIN_ENV, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return root, command


def config_of(command, **mesh) -> Config:
  """The run's Config (its main.py command's overrides applied to configs/default.py)."""
  from configs import default
  config = from_config_dict(apply_overrides(default.get_config(), command))
  return dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, **mesh)) if mesh else config


def test_eval_mode_equals_the_training_eval_bitwise_on_the_same_mesh(trained):
  root, command = trained
  result = subprocess.run([*command, "--mode=eval", "--step=12"], cwd=ROOT, env=MAIN_ENV,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert ">>> eval  step 12: loss" in result.stderr
  in_training = metrics.read_jsonl(str(root / "run"), "eval")
  standalone = metrics.read_jsonl(str(root / "run" / "eval"), "eval")
  assert sorted(in_training) == [12, 24] and 12 in standalone
  assert standalone[12]["loss"] == in_training[12]["loss"]  # bitwise: same mesh, same dtype
  assert standalone[12]["tokens"] == in_training[12]["tokens"]
  assert sorted(os.listdir(root / "run" / "checkpoints")) == ["12", "24"]  # nothing written there


def test_eval_on_one_device_of_a_run_trained_on_eight(trained):
  root, command = trained
  config = config_of(command, data=1, fsdp=1)
  results = evaluate.run(config, str(root / "run"), devices=jax.devices()[:1])
  in_training = metrics.read_jsonl(str(root / "run"), "eval")
  assert sorted(results) == [STEPS]  # the latest
  assert math.isclose(results[STEPS]["loss"], in_training[STEPS]["loss"], rel_tol=1e-6)
  assert results[STEPS]["tokens"] == in_training[STEPS]["tokens"]


def test_eval_on_eight_devices_of_a_checkpoint_written_on_one(trained, tmp_path):
  root, command = trained
  one = config_of(command, data=1, fsdp=1)
  config_of8 = config_of(command, data=2, fsdp=2, tensor=2)
  # A one-device checkpoint: the trained params restored onto one device and saved from there.
  reference = evaluate.run(one, str(root / "run"), step=12, devices=jax.devices()[:1])[12]
  rt = runtime.setup(one, jax.devices()[:1])
  with sharding.activate(rt.mesh):
    fns = runtime.train_functions(rt, make_optimizer(one.train, STEPS))
    params = evaluate.ParamsSource(str(root / "run" / "checkpoints"), rt.abstract_params,
                                   to_dict(one)).at(12)
    state = fns.create_state().replace(params=params)
    saver = checkpoint.Checkpoints(str(tmp_path / "one" / "checkpoints"), one.train)
    saver.save(12, state, {})
    saver.finish()
  result = evaluate.run(config_of8, str(tmp_path / "one"), devices=jax.devices())[12]
  assert math.isclose(result["loss"], reference["loss"], rel_tol=1e-6)
  assert result["tokens"] == reference["tokens"]


def test_follow_evaluates_new_checkpoints_as_they_appear(trained, tmp_path):
  root, command = trained
  config = config_of(command)
  source = root / "run" / "checkpoints"
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  shutil.copytree(source / "12", tmp_path / "run" / "checkpoints" / "12")
  results = {}
  follower = threading.Thread(target=lambda: results.update(
      evaluate.run(config, str(tmp_path / "run"), follow=True, follow_timeout=60)))
  follower.start()
  deadline = time.time() + 120  # the follower first evaluates what is there
  while not (tmp_path / "run" / "eval" / "metrics.jsonl").exists() and time.time() < deadline:
    time.sleep(0.1)
  # Appears as orbax makes it appear: complete, under its final name at once.
  shutil.copytree(source / "24", tmp_path / "24")
  os.rename(tmp_path / "24", tmp_path / "run" / "checkpoints" / "24")
  follower.join(timeout=120)
  assert not follower.is_alive()
  in_training = metrics.read_jsonl(str(root / "run"), "eval")
  assert sorted(results) == [12, 24]  # stops at config.train.num_train_steps
  assert all(results[s]["loss"] == in_training[s]["loss"] for s in results)
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["12", "24"]  # read, never written


def test_sample_reproduces_the_repetitive_corpus(trained):
  root, command = trained
  args = [a for a in command[2:] if a.startswith(("--config", "--workdir"))]
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sample.py"), *args,
                           "--prompt=0123", "--max_tokens=80"], cwd=ROOT, env=MAIN_ENV,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith(TEXT[:44])
  # 80 new tokens after the prompt's 4 and a BOS pass max_seq_len 64: the last 21 saw a slid context.
  assert len(result.stdout.rstrip("\n")) == 84
  assert "Context slid: the prompt (5 tokens) and the new ones pass config.model.max_seq_len = 64, so 21 new " \
         "token(s) were drawn from the last 64 tokens only" in result.stderr


def test_no_checkpoint_names_the_path(trained, tmp_path):
  _, command = trained
  with pytest.raises(TrainingError, match=f"No checkpoint: {tmp_path}/run/checkpoints does not exist"):
    evaluate.run(config_of(command), str(tmp_path / "run"))
  (tmp_path / "run" / "checkpoints" / "junk").mkdir(parents=True)
  with pytest.raises(TrainingError, match=r"No complete checkpoint in .*/run/checkpoints: found \['junk'\]"):
    evaluate.run(config_of(command), str(tmp_path / "run"))


def test_eval_mode_errors_say_evaluation_stopped(tmp_path):
  result = subprocess.run(main_command(tmp_path / "run", tmp_path / "data", tmp_path, "--mode=eval"), cwd=ROOT,
                          env=MAIN_ENV, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert f"Evaluation stopped: No checkpoint: {tmp_path}/run/checkpoints does not exist" in result.stderr
  assert "Training stopped" not in result.stderr


def test_missing_step_lists_the_steps(trained):
  root, command = trained
  with pytest.raises(TrainingError, match=r"--step=7: there is no checkpoint of step 7 in .*; it holds "
                                          r"steps \[12, 24\]"):
    evaluate.run(config_of(command), str(root / "run"), step=7)


def test_shape_mismatch_names_the_tensor_and_both_shapes(trained):
  root, command = trained
  config = config_of(command)
  config = dataclasses.replace(config, model=dataclasses.replace(config.model, mlp_dim=96))
  with pytest.raises(ConfigError, match=r"run/checkpoints/24: tensor layers/mlp/down_proj has shape "
                                        r"\(2, 128, 64\) there, \(2, 96, 64\) in this config"):
    evaluate.run(config, str(root / "run"))


def test_a_switch_that_changes_no_shape_is_still_checked(trained):
  root, command = trained
  config = config_of(command)
  config = dataclasses.replace(config, model=dataclasses.replace(config.model, rope_theta=5e5))
  with pytest.raises(ConfigError, match="holds parameters of another model: model.rope_theta = 10000.0 "
                                        "there, 500000.0 here"):
    evaluate.run(config, str(root / "run"))


def test_partial_checkpoint_falls_back_to_the_newest_complete_one(trained, tmp_path, caplog):
  console.logger.addHandler(caplog.handler)  # the `lm` logger does not propagate to the root
  try:
    _partial_checkpoint(trained, tmp_path, caplog)
  finally:
    console.logger.removeHandler(caplog.handler)


def _partial_checkpoint(trained, tmp_path, caplog):
  root, command = trained
  checkpoints = tmp_path / "run" / "checkpoints"
  shutil.copytree(root / "run" / "checkpoints", checkpoints)
  # A save cut off before orbax committed it, and a newest step whose array files are gone.
  shutil.copytree(checkpoints / "12", checkpoints / "36.orbax-checkpoint-tmp-1234")
  for path in (checkpoints / "24" / "state").iterdir():
    if path.name != "_METADATA" and path.is_dir():
      shutil.rmtree(path)
  results = evaluate.run(config_of(command), str(tmp_path / "run"))
  assert sorted(results) == [12]
  in_training = metrics.read_jsonl(str(root / "run"), "eval")
  assert results[12]["loss"] == in_training[12]["loss"]
  log = caplog.text
  assert "36.orbax-checkpoint-tmp-1234 is a partially written checkpoint" in log
  assert f"{checkpoints}/24 cannot be read" in log and "falling back" in log
