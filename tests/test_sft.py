"""Supervised fine-tuning end to end: a chat source through the one loop (`lm.training.train` with the next-token
kind), the loss on the assistant's tokens alone, and sampling with the template it was trained on."""

import json
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from lm.config import from_config_dict
from lm.data import batching, corpus
from lm.model import sharding
from lm.training import metrics, runtime, train
from lm.training.train_step import token_logprobs, token_losses
from tests.helpers import FAST_COMPILE, apply_overrides
from tests.test_train import ROOT, TINY

LETTERS = "abcdefghijklmnopqrstuvwxyz"
STEPS = 200


def conversation(word: str) -> dict:
  """The task: the user gives three letters, the assistant answers them in capitals (so the answer depends
  on the prompt: a model that ignores it cannot do better than 3 x ln 26 nats per answer)."""
  return {"messages": [{"role": "user", "content": word}, {"role": "assistant", "content": word.upper()}]}


@pytest.fixture(scope="module")
def chat_task(tmp_path_factory):
  directory = tmp_path_factory.mktemp("chat")
  rng = random.Random(0)
  words = ["".join(rng.choice(LETTERS) for _ in range(3)) for _ in range(3000)]
  held_out = set(words[2800:]) - set(words[:2800])
  (directory / "train.jsonl").write_text("".join(json.dumps(conversation(w)) + "\n" for w in words[:2800]))
  (directory / "val.jsonl").write_text("".join(json.dumps(conversation(w)) + "\n" for w in sorted(held_out)))
  return directory, sorted(held_out)


def sft_overrides(directory) -> list[str]:
  """The tiny model of the other tests on the chat task, one device (flags for main.py and sample.py)."""
  return [*TINY, "--config.mesh.data=1", "--config.mesh.fsdp=1", f"--config.data.data_dir={directory}/data",
          "--config.data.sources.main.kind=chat", f"--config.data.sources.main.path={directory}/train.jsonl",
          f"--config.data.sources.main.validation={directory}/val.jsonl", "--config.data.eval_sequences=0",
          "--config.train.micro_batch_size=16", "--config.train.gradient_accumulation_steps=1",
          f"--config.train.num_train_steps={STEPS}", "--config.train.learning_rate=3e-3",
          "--config.train.warmup_steps=10", f"--config.train.eval_interval_steps={STEPS}",
          f"--config.train.save_interval_steps={STEPS}", "--config.train.log_interval_steps=50"]


def test_a_tiny_model_learns_a_chat_task_whose_answers_depend_on_the_prompt(chat_task, tmp_path):
  directory, held_out = chat_task
  config = from_config_dict(apply_overrides(default.get_config(), sft_overrides(directory)))
  workdir = str(tmp_path / "run")
  last = train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  evals = metrics.read_jsonl(workdir, "eval")
  # Scored: the answer's 3 letters, the plain template's newline and the end of document; not the prompt.
  assert evals[STEPS]["tokens"] == 5 * len(held_out)
  # Ignoring the prompt costs at least 3 ln 26 / 5 = 1.95 nats per scored token; measured here 0.19.
  assert last["eval_loss"] < 0.5, last
  # Sampled as it was trained: sample.py --chat renders the same plain template and stops at the end.
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}",
             TF_CPP_MIN_LOG_LEVEL="2")
  words = held_out[:3]
  answers = []
  for word in words:
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "sample.py"), f"--config={ROOT}/configs/default.py",
         *sft_overrides(directory), f"--workdir={workdir}", "--chat", f"--prompt={word}", "--max_tokens=8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    answers.append(result.stdout.strip())
  assert sum(a == w.upper() for a, w in zip(answers, words)) >= 2, (words, answers)


def test_only_the_assistant_targets_are_scored(chat_task):
  """The loss is the cross-entropy summed over the positions whose target is an assistant token, and
  counts those alone: a prompt token's prediction adds nothing (its gradient is zero)."""
  directory, _ = chat_task
  config = from_config_dict(apply_overrides(default.get_config(), sft_overrides(directory)))
  rt = runtime.setup(config, jax.devices()[:1])
  _, prepared = corpus.prepare_all(config.data, config.model.vocab_size)
  batch = corpus.eval_batches(config.data, prepared, config.train.seq_len, 4).get(0)
  with sharding.activate(rt.mesh):
    params = sharding.strip_boxes(jax.jit(rt.init_params)(rt.rng))
    figures = jax.device_get(token_losses(rt.model, params, batch))
    logp = np.asarray(token_logprobs(rt.model, params, batch))
  mask = batch[batching.MASK]
  assert mask.sum() and not (mask & (batch["segment_ids"] == 0)).any()
  np.testing.assert_allclose(figures["sequence_loss"], -np.where(mask, logp, 0).sum(-1), rtol=1e-6)
  assert figures["sequence_tokens"].tolist() == mask.sum(-1).tolist()
  # Each conversation: the targets of "user: abc\nassistant: " are unscored, "ABC\n" and the end are scored.
  learned = batching.targets(batch["tokens"])[mask]
  assert set(learned.tolist()) <= {ord(c) + 3 for c in LETTERS.upper() + "\n"} | {2}
