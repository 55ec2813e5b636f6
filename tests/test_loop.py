"""One loop for every kind of training (`lm.training.train`): each kind gets each of its features by construction.
Checked per kind: the step's figures are fetched one step late, the profiler traces the steps named, the
saved run description carries the batch that fixes the data order (and a resume with another batch says
so), config.train.num_epochs, and a kill -9 resumes bit for bit."""

import glob
import os
import signal
import subprocess

import jax
import pytest

from configs import default
from lm import console
from lm.checkpoints import checkpoint
from lm.config import from_config_dict
from lm.errors import ConfigError
from lm.training import metrics, runtime, train
from tests.helpers import apply_overrides
from tests.test_faults import _complete, _logged, _wait
from tests.test_sft import chat_task  # noqa: F401
from tests.test_train import MAIN_ENV, ROOT, TINY, corpus, main_command, run_main  # noqa: F401

GRPO = ["--config.grpo.enabled=True", "--config.grpo.max_operand=9", "--config.grpo.max_completion_tokens=4",
        "--config.grpo.eval_prompts=8", "--config.grpo.rewards=lm.training.rewards.exact_answer,tests.test_grpo._parity_reward"]
KINDS = ("pretraining", "sft", "grpo")


def kind_flags(kind: str, chat_dir) -> list[str]:
  """The flags that make the tiny run of tests/test_train.py one of the kinds (SFT: test_sft's chat task)."""
  return {"pretraining": [], "grpo": GRPO,
          "sft": ["--config.data.sources.main.kind=chat", f"--config.data.sources.main.path={chat_dir}/train.jsonl",
                  f"--config.data.sources.main.validation={chat_dir}/val.jsonl"]}[kind]


@pytest.fixture
def configure(tmp_path, corpus, chat_task):
  def config(kind: str, *flags):
    c = apply_overrides(default.get_config(), TINY + [f"--config.data.sources.main.path={corpus}/*.py",
                                                      f"--config.data.sources.main.validation={corpus}/bisect.py",
                                                      *kind_flags(kind, chat_task[0]), *flags])
    c.mesh.data, c.mesh.fsdp = 2, 1
    c.data.data_dir = str(tmp_path / "data")
    c.train.peak_flops_per_device = 1e9
    return from_config_dict(c)
  return config


@pytest.fixture
def warnings(caplog):
  console.logger.addHandler(caplog.handler)  # the `lm` logger does not propagate to the root
  yield caplog
  console.logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_fetches_late_profiles_and_warns_of_another_batch_on_resume(kind, tmp_path, configure, monkeypatch,
                                                                               warnings):
  events = []
  made, recorded = train.make_kind, train._record

  def make_kind(rt):
    k = made(rt)
    batch = k.batch
    k.batch = lambda step, state: (events.append(("batch", step + 1)), batch(step, state))[1]
    return k

  monkeypatch.setattr(train, "make_kind", make_kind)
  monkeypatch.setattr(train, "_record", lambda run, logger, step, *rest: (events.append(("record", step)),
                                                                          recorded(run, logger, step, *rest)))
  workdir = str(tmp_path / "run")
  config = configure(kind, "--config.train.num_train_steps=4", "--config.train.save_interval_steps=4",
                   "--config.train.eval_interval_steps=4", "--config.train.profile_steps=2:3")
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:2])
  if kind == "grpo":  # on-policy: step s is checked before step s + 1 samples from its state (which waits for it)
    assert events == [("batch", 1), ("record", 1), ("batch", 2), ("record", 2), ("batch", 3), ("record", 3),
                      ("batch", 4), ("record", 4)]
  else:  # step s's figures are fetched once step s + 1 is dispatched; the last step's before its eval and save
    assert events == [("batch", 1), ("batch", 2), ("record", 1), ("batch", 3), ("record", 2), ("batch", 4),
                      ("record", 3), ("record", 4)]
  assert sorted(metrics.read_jsonl(workdir)) == [1, 2, 3, 4]
  xplane, = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  with open(xplane, "rb") as f:
    assert b"jit_train_step" in f.read()
  saved = checkpoint.saved_config(checkpoint.reader(os.path.join(workdir, "checkpoints")), 4)
  assert saved["global_batch_sequences"] == 8
  events.clear()
  more = configure(kind, "--config.train.num_train_steps=5", "--config.train.save_interval_steps=5",
                 "--config.train.eval_interval_steps=5", "--config.train.micro_batch_size=4")
  train.train_and_evaluate(more, workdir, devices=jax.devices()[:2])
  assert "written with a global batch of 8 sequences, this run has 16" in warnings.text
  assert events == [("batch", 5), ("record", 5)]


@pytest.mark.parametrize("kind", ["pretraining", "sft"])
def test_num_epochs_sets_the_steps_of_next_token_training(kind, tmp_path, configure):
  epoch = configure(kind, "--config.train.num_train_steps=0", "--config.train.num_epochs=1",
                    "--config.train.save_interval_steps=1000", "--config.train.eval_interval_steps=1000",
                    "--config.train.log_interval_steps=1000", "--config.train.micro_batch_size=16",
                    "--config.train.gradient_accumulation_steps=8")
  last = train.train_and_evaluate(epoch, str(tmp_path / "epoch"), devices=jax.devices()[:2])
  steps_per_epoch = train.make_kind(runtime.setup(epoch, jax.devices()[:2])).steps_per_epoch
  assert last["step"] == steps_per_epoch > 0


def test_num_epochs_is_refused_by_grpo(tmp_path, configure):
  grpo = configure("grpo", "--config.train.num_train_steps=0", "--config.train.num_epochs=1")
  with pytest.raises(ConfigError, match="a GRPO task's prompts have no epochs"):
    train.train_and_evaluate(grpo, str(tmp_path / "grpo"), devices=jax.devices()[:2])
  assert not os.path.exists(tmp_path / "grpo" / "checkpoints" / "1")


STEPS = ["--config.train.num_train_steps=6", "--config.train.save_interval_steps=2",
         "--config.train.eval_interval_steps=6"]


@pytest.mark.parametrize("kind", [pytest.param("pretraining", marks=pytest.mark.slow), "sft", "grpo"])
def test_a_kill_9_resumes_bit_identical_in_each_kind(kind, tmp_path, corpus, chat_task):
  """The loop's checkpoints hold what each kind needs: killed between saves, the resumed run logs the very
  figures of a run that was never stopped (GRPO: the same prompts, samples, rewards and updates)."""
  flags = [*kind_flags(kind, chat_task[0]), *STEPS]
  straight = run_main(tmp_path / "straight", tmp_path / "data", corpus, *flags)
  assert straight.returncode == 0, straight.stderr[-2000:]
  expected = metrics.read_jsonl(str(tmp_path / "straight"))
  workdir = str(tmp_path / "killed")
  process = subprocess.Popen(main_command(workdir, tmp_path / "data", corpus, *flags), cwd=ROOT, env=MAIN_ENV,
                             stderr=subprocess.PIPE, text=True)
  _wait(process, lambda: 3 in _logged(workdir) and 2 in _complete(workdir), "step 3")
  process.send_signal(signal.SIGKILL)
  process.communicate(timeout=60)
  resumed = run_main(workdir, tmp_path / "data", corpus, *flags)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step" in resumed.stderr
  again = metrics.read_jsonl(workdir)
  figures = ("loss", "grad_norm") + (("reward_mean", "kl") if kind == "grpo" else ())
  assert {s: [again[s][f] for f in figures] for s in range(1, 7)} == \
      {s: [expected[s][f] for f in figures] for s in range(1, 7)}
