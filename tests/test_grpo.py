"""GRPO: group advantages, the rows and their loss mask, the startup checks, and a short LoRA run through
main.py's entry that logs every figure, saves the adapters and resumes."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import default
from lm.checkpoints import checkpoint
from lm.config import from_config_dict
from lm.errors import ConfigError
from lm.model import lora
from lm.training import grpo, metrics, rewards, train, train_step
from tests.helpers import apply_overrides, needs_libtpu
from tests.test_plan import tpu_config
from tests.test_train import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_advantages_are_normalised_within_each_group():
  r = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
  a = grpo.advantages(r, 4)  # mean 0.5, sample std sqrt(1 / 3) (TRL's, with Bessel's correction)
  half = 0.5 / (np.sqrt(1 / 3) + 1e-4)
  assert np.allclose(a[:4], [half, -half, -half, half], rtol=1e-6) and np.array_equal(a[4:], np.zeros(4))


def test_rows_mask_the_completion_targets_only():
  batch = grpo.assemble(np.array([[1, 5, 6], [0, 1, 9]], np.int32), np.array([3, 2]), [[7, 8, 2], [4, 2]], 8)
  assert batch["tokens"].tolist() == [[1, 5, 6, 7, 8, 2, 0, 0], [1, 9, 4, 2, 0, 0, 0, 0]]
  assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
  # Position t's target is token t + 1: positions 2, 3, 4 predict the completion 7, 8 and its end; the
  # left-padded second prompt starts its row (its padding dropped).
  assert batch["mask"].tolist() == [[False, False, True, True, True, False, False, False],
                                    [False, True, True, False, False, False, False, False]]
  assert grpo.completions_of(np.array([[7, 8, 2, 2], [3, 3, 3, 3]]), (2,)) == ([[7, 8, 2], [3, 3, 3, 3]], pytest.approx([3, 4]))


def test_the_sampler_batch_gives_each_device_and_process_the_rows_it_trains_on():
  """`by_device`: the sampler's batch of a step's rows, split over the batch axes, puts each row on the device
  that trains on it, and a process's rows (in its order) where `put_batch` puts them; `gather_rows` places
  each row's figures at its position."""
  from lm.data import batching
  from lm.model import sharding
  from tests.helpers import mesh_config
  mesh = sharding.make_mesh(mesh_config(data=4, fsdp=2))
  plan = batching.batch_plan(2, 3, 8, mesh)  # 16 rows a micro-batch, 48 a step
  order = grpo.by_device(np.arange(48), plan)
  sampled = sharding.batch_sharding(mesh).devices_indices_map((48,))
  trained = sharding.step_batch_sharding(mesh).devices_indices_map((3, 16))
  step_MxR = np.arange(48).reshape(3, 16)
  for device in mesh.devices.flat:
    np.testing.assert_array_equal(np.sort(order[sampled[device]]), step_MxR[trained[device]].ravel())
  for half in (mesh.devices.flat[:4], mesh.devices.flat[4:]):  # two processes
    np.testing.assert_array_equal(grpo.by_device(batching.step_rows(mesh, plan, half), plan),
                                  order[sharding.process_rows(mesh, 48, half)])
  gathered = grpo.gather_rows({"r": np.array([0.1, 0.2]), "n": np.array([[1, 2], [3, 4]])}, np.array([1, 0]), 2)
  assert gathered["r"].tolist() == [0.2, 0.1] and gathered["n"].tolist() == [[3, 4], [1, 2]]


def test_arithmetic_prompts_are_fixed_by_seed_split_and_index():
  cfg = from_config_dict(default.get_config()).grpo
  prompts, answers = rewards.arithmetic(0, "train", [0, 1, 2], cfg)
  assert prompts == rewards.arithmetic(0, "train", [0, 1, 2], cfg)[0] != rewards.arithmetic(0, "eval", [0, 1, 2], cfg)[0]
  assert len({len(p) for p in prompts}) == 1 and all(p.endswith("=") for p in prompts)
  a, b = prompts[0][:-1].split("+")
  assert answers[0] == str(int(a) + int(b))
  assert rewards.exact_answer([" 12", "13"], ["12", "12"]) == [1.0, 0.0]
  assert rewards.answer_format(["12", "1 2"], ["", ""]) == [0.1, 0.0]


def test_jsonl_problems_hold_out_the_first_lines_and_shuffle_the_rest(tmp_path):
  lines = [f'{{"prompt": "{i}*2=", "answer": "{2 * i}"}}' for i in range(10)]
  (tmp_path / "p.jsonl").write_text("\n".join(lines))
  cfg = dataclasses.replace(from_config_dict(default.get_config()).grpo, dataset=str(tmp_path / "p.jsonl"),
                            eval_prompts=2)
  assert rewards.jsonl_problems(0, "eval", [0, 1], cfg) == (["0*2=", "1*2="], ["0", "2"])
  prompts, answers = rewards.jsonl_problems(0, "train", range(16), cfg)
  assert sorted(prompts[:8]) == sorted(f"{i}*2=" for i in range(2, 10)) and prompts[8:] != prompts[:8]
  assert all(a == str(2 * int(p.split("*")[0])) for p, a in zip(prompts, answers))
  assert prompts == rewards.jsonl_problems(0, "train", range(16), cfg)[0] != rewards.jsonl_problems(1, "train", range(16), cfg)[0]
  (tmp_path / "bad.jsonl").write_text('{"prompt": "1"}\n')
  with pytest.raises(ConfigError, match=r"line 1: not a JSON object with \"prompt\" and \"answer\""):
    rewards.jsonl_problems(0, "train", [0], dataclasses.replace(cfg, dataset=str(tmp_path / "bad.jsonl")))


def test_without_old_log_probabilities_the_ratio_is_the_updates_own_held_constant():
  """num_iterations 1: the loss and its gradient are those of old log-probabilities computed by a separate
  pass of the same parameters (what the rollout no longer runs); beta 0: no KL term and no KL figure."""
  import jax.numpy as jnp
  from flax import linen as nn
  from lm import console
  from lm.model.decoder import Decoder
  from tests.helpers import tiny_model
  model = Decoder(tiny_model())
  rows = grpo.assemble(np.array([[1, 5, 6], [0, 1, 9]], np.int32), np.array([3, 2]), [[7, 8, 2], [4, 2]], 16)
  rows["advantages"] = np.array([1.0, -1.0], np.float32)
  params = nn.unbox(model.init(jax.random.key(0), rows["tokens"], rows["segment_ids"], rows["positions"])["params"])
  old = np.asarray(train_step.token_logprobs(model, params, rows))
  ref = old - 0.1
  def loss(p, batch, beta):
    return jnp.sum(grpo.policy_losses(model, p, batch, beta=beta, epsilon=0.2, temperature=1.0)["sequence_loss"])
  for beta in (0.0, 0.04):
    with_ref = {"ref_logprobs": ref} if beta else {}
    separate = jax.value_and_grad(loss)(params, {**rows, **with_ref, "old_logprobs": old}, beta)
    own = jax.value_and_grad(loss)(params, {**rows, **with_ref}, beta)
    np.testing.assert_allclose(own[0], separate[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), own[1], separate[1])
  figures = grpo.policy_losses(model, params, rows, beta=0.0, epsilon=0.2, temperature=1.0)
  assert "sequence_kl" not in figures and set(figures) == {"sequence_loss", "sequence_tokens", "sequence_clipped"}
  line = console.step_line(3, 10, {"loss": 0.1, "loss_ema": 0.2, "learning_rate": 1e-3, "grad_norm": 1.0,
                                   "reward_mean": 0.25, "completion_length": 7.5, "finished": 0.75}, None)
  assert "reward 0.250" in line and "length 7.5 | ended 0.75" in line and "kl" not in line


def test_the_completion_window_gives_the_loss_and_gradient_of_whole_rows():
  """`logit_positions` (the rollout's rows): the logits of a window over each completion alone, moved back
  where it would run past the row; the same per-sequence loss, KL and gradient as the logits of every position."""
  import jax.numpy as jnp
  from flax import linen as nn
  from lm.model.decoder import Decoder
  from tests.helpers import tiny_model
  model = Decoder(tiny_model())
  prompts, lengths, completions = np.array([[1, 5, 6], [0, 1, 9]], np.int32), np.array([3, 2]), [[7, 8, 2], [4, 2]]
  whole = grpo.assemble(prompts, lengths, completions, 7)
  windowed = grpo.assemble(prompts, lengths, completions, 7, window=6)
  assert windowed["logit_positions"].tolist() == [[1, 2, 3, 4, 5, 6]] * 2  # row 0's moved back from 2 to 1
  params = nn.unbox(model.init(jax.random.key(0), whole["tokens"], whole["segment_ids"], whole["positions"])["params"])
  ref = np.asarray(train_step.token_logprobs(model, params, whole)) - 0.1
  for batch, ref_logprobs in ((whole, ref), (windowed, np.take_along_axis(ref, windowed["logit_positions"], 1))):
    batch.update(advantages=np.array([1.0, -0.5], np.float32), ref_logprobs=ref_logprobs)

  def loss(p, batch):
    figures = grpo.policy_losses(model, p, batch, beta=0.04, epsilon=0.2, temperature=0.7)
    return jnp.sum(figures["sequence_loss"]), figures
  (a, a_figures), a_grad = jax.value_and_grad(loss, has_aux=True)(params, whole)
  (b, b_figures), b_grad = jax.value_and_grad(loss, has_aux=True)(params, windowed)
  np.testing.assert_allclose(b, a, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a_figures, b_figures)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a_grad, b_grad)
  assert b_figures["sequence_tokens"].tolist() == [3, 2]


def test_word_problems_never_hold_out_a_trained_problem_and_the_last_number_is_the_answer():
  cfg = from_config_dict(default.get_config()).grpo
  train_texts, train_answers = rewards.word_problems(0, "train", range(3000), cfg)
  eval_texts, _ = rewards.word_problems(0, "eval", range(300), cfg)
  assert not set(train_texts) & set(eval_texts) and len(set(eval_texts)) > 200
  assert (train_texts[:5], train_answers[:5]) == rewards.word_problems(0, "train", range(5), cfg)
  assert train_texts[:5] != rewards.word_problems(1, "train", range(5), cfg)[0]
  assert all(rewards.held_out_problem(t) for t in eval_texts) and not any(map(rewards.held_out_problem, train_texts))
  assert rewards.last_number(["5 + 3 = 8, so 8.", "It is 12", "none", "1,024", "-3"], ["8", "13", "1", "1024", "-3"]) == \
      [1.0, 0.0, 0.0, 1.0, 1.0]


def test_a_tagged_answer_is_the_last_tag_whatever_comes_before():
  completions = ["I think 41. <answer> 42 </answer>", "so \\boxed{1,200}", "12 + 5\n#### 17.\nThat is all.",
                 "the answer is 42", "<answer>4</answer>, no: #### 5", "#### ", "<answer>4</answer>"]
  assert rewards.tagged_answer(completions, ["42", "1200", "17", "42", "5", "", "5"]) == [1, 1, 1, 0, 1, 0, 0]


def test_chat_prompts_are_what_sample_py_feeds_bucketed_and_end_at_the_turn(tmp_path):
  """config.grpo.chat: each prompt is the user's message in the model's template (here the byte tokenizer's
  plain one), its ids those of `sample.py --chat`, left-padded to a multiple of PROMPT_BUCKET; the
  completions end at the chat's stop ids."""
  from lm.data import chat as lm_chat
  from lm.data import corpus
  c = _config(tmp_path, **{"grpo.chat": True, "grpo.system_prompt": "Answer with a number.",
                           "grpo.task": "lm.training.rewards.word_problems", "train.seq_len": 256,
                           "model.max_seq_len": 256})
  config = from_config_dict(c)
  tokenizer = corpus.load_tokenizer(config.data, config.model.vocab_size)
  task = grpo.make_task(config, tokenizer)
  prompts, lengths, _ = task.prompts("train", range(4))
  texts, _ = rewards.word_problems(config.train.seed, "train", range(4), config.grpo)
  chat = corpus.load_chat(config.data, tokenizer)
  for row, n, text in zip(prompts, lengths, texts):
    ids = tokenizer.encode_special(chat.render(lm_chat.messages(text, "Answer with a number.")))
    assert row[len(row) - n:].tolist() == ids and not row[:len(row) - n].any()
  assert prompts.shape[1] % grpo.PROMPT_BUCKET == 0 and prompts.shape[1] >= lengths.max()
  assert task.stop_ids == chat.stop_ids


def test_with_lora_the_sampler_decodes_with_the_adapters_folded_into_the_weights(tmp_path):
  """The sampler folds the adapters into the weights (one decoder without adapter matmuls per step): its
  greedy completions are the adapted model's, token for token."""
  from lm.model import sharding
  from lm.training import runtime
  from lm.training.optimizer import make_optimizer
  config = from_config_dict(_config(tmp_path))
  rt = runtime.setup(config, jax.devices()[:2])
  sampler = grpo.make(rt).sampler
  with sharding.activate(rt.mesh):
    state = runtime.train_functions(rt, make_optimizer(config.train, 4), losses=grpo.policy_losses).create_state()
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state.params))))
  adapters = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), state.params)
  params = lora.merge(state.frozen, adapters)
  prompts, lengths, _ = sampler.task.prompts("eval", range(8))
  folded = sampler._generate(params, prompts, lengths, jax.random.key(0), 0.0, 8)
  assert sampler._decoder.cfg.lora_rank == 0 and not lora.count(sampler._fold(params))
  sampler._decoder, sampler._fold = rt.model, lambda p: p  # the adapted model, adapters apart
  assert np.array_equal(folded, sampler._generate(params, prompts, lengths, jax.random.key(0), 0.0, 8))
  base = sampler._generate(lora.merge(state.frozen, jax.tree.map(jnp.zeros_like, adapters)), prompts, lengths,
                           jax.random.key(0), 0.0, 8)
  assert not np.array_equal(folded, base)  # the adapters change the completions: the comparison can fail


def test_the_completion_window_is_whole_logit_chunks(tmp_path):
  """With the logits in chunks (model.logits_chunk < seq_len), the window of the update's logits is rounded up
  to whole chunks (token_logprobs chunks it); else it is max_completion_tokens."""
  from lm.training import runtime
  for chunk, completion, window in ((16, 20, 32), (16, 16, 16), (0, 20, 20), (16, 40, 48)):
    config = from_config_dict(_config(tmp_path, **{"model.logits_chunk": chunk, "grpo.max_completion_tokens": completion}))
    assert grpo.make(runtime.setup(config, jax.devices()[:2])).sampler.window == window


def _config(tmp_path, **changes):
  c = apply_overrides(default.get_config(), TINY)
  c.mesh.data, c.mesh.fsdp = 2, 1
  c.model.lora_rank = 4
  c.train.micro_batch_size, c.train.gradient_accumulation_steps = 4, 2
  c.train.num_train_steps, c.train.save_interval_steps, c.train.eval_interval_steps = 4, 2, 4
  c.train.log_interval_steps, c.train.warmup_steps, c.train.peak_flops_per_device = 1, 0, 1e9
  c.grpo.enabled, c.grpo.max_operand, c.grpo.max_completion_tokens, c.grpo.eval_prompts = True, 9, 4, 8
  for key, value in changes.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def _bad_reward(completions, answers):
  return [1.0]


@pytest.mark.parametrize("change,message", [
    ({"grpo.num_generations": 1}, "config.grpo.num_generations = 1: GRPO normalises each completion's reward"),
    ({"grpo.rewards": "lm.training.rewards.no_such"}, "config.grpo.rewards: 'lm.training.rewards.no_such' cannot be imported"),
    ({"grpo.rewards": "tests.test_grpo._bad_reward"}, "tests.test_grpo._bad_reward returned (1,) values for 2"),
    ({"grpo.max_completion_tokens": 60}, "The prompts (5 tokens) + config.grpo.max_completion_tokens = 60 are "
                                         "longer than config.train.seq_len = 64"),
    ({"grpo.num_generations": 3}, "is not a multiple of config.grpo.num_generations = 3"),
])
def test_bad_grpo_settings_stop_at_startup(tmp_path, change, message):
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(from_config_dict(_config(tmp_path, **change)), str(tmp_path / "run"),
                            devices=jax.devices()[:2])
  assert message in str(e.value)
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "2")


def _parity_reward(completions, answers):
  """Rewards that differ within a group even for a random model (the answers it never gets right)."""
  return [float(ord(c[0]) % 2) if c else 0.0 for c in completions]


def test_at_the_reference_the_kl_term_takes_the_policys_own_log_probabilities():
  """Rows marked `at_reference` (the policy is the reference) take the update's own log-probabilities as the
  reference's: with zero advantages the loss and its gradient are exactly 0, where reference log-probabilities
  off by rounding (1e-6) give a gradient of rounding."""
  import jax.numpy as jnp
  from flax import linen as nn
  from lm.model.decoder import Decoder
  from tests.helpers import tiny_model
  model = Decoder(tiny_model())
  rows = grpo.assemble(np.array([[1, 5, 6], [0, 1, 9]], np.int32), np.array([3, 2]), [[7, 8, 2], [4, 2]], 16)
  rows["advantages"] = np.zeros(2, np.float32)
  params = nn.unbox(model.init(jax.random.key(0), rows["tokens"], rows["segment_ids"], rows["positions"])["params"])
  rounded = np.asarray(train_step.token_logprobs(model, params, rows)) * (1 + 1e-6)

  def grads(at_reference: bool):
    batch = {**rows, "ref_logprobs": rounded, "at_reference": np.full(2, at_reference)}
    return jax.grad(lambda p: jnp.sum(grpo.policy_losses(model, p, batch, beta=0.04, epsilon=0.2,
                                                           temperature=1.0)["sequence_loss"]))(params)
  assert all(not np.any(g) for g in jax.tree.leaves(grads(True)))
  assert any(np.any(g) for g in jax.tree.leaves(grads(False)))


def test_at_the_reference_with_zero_advantages_the_step_is_exactly_zero(tmp_path):
  """Every reward 0 (zero advantages) from the adapters' start (B = 0: the policy is the reference): the
  gradient is exactly 0, as in TRL, and the adapters stay where they are. With the reference's
  log-probabilities from a reference pass, XLA's optimised programs (not the suite's fast-compile flags, hence
  a process of its own) rounded them otherwise than the update: a gradient norm of 7e-9, which Adam blew up
  into a step of B."""
  code = f"""
import json, os, sys
sys.path.insert(0, {ROOT!r})
import jax, numpy as np
from flax import traverse_util
from lm.checkpoints import param_files
from lm.config import from_config_dict
from lm.training import metrics, train
from tests.test_grpo import _config
config = from_config_dict(_config({str(tmp_path)!r}, **{{"grpo.rewards": "tests.test_grpo._no_reward", "grpo.beta": 0.1,
    "train.num_train_steps": 2, "train.save_interval_steps": 2, "train.eval_interval_steps": 2}}))
workdir = {str(tmp_path / "run")!r}
train.train_and_evaluate(config, workdir, devices=jax.devices()[:2])
adapters, _ = param_files.load_params_on_host(os.path.join(workdir, "checkpoints"), 2, adapters=True)
b = [float(np.abs(v).max()) for k, v in traverse_util.flatten_dict(adapters, sep="/").items() if k.endswith("_lora_b")]
print(json.dumps({{"grad_norm": [r["grad_norm"] for r in metrics.read_jsonl(workdir).values()], "b": b}}))
"""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  figures = json.loads(run.stdout.strip().splitlines()[-1])
  assert figures["grad_norm"] == [0.0, 0.0]
  assert figures["b"] and max(figures["b"]) == 0.0


def _no_reward(completions, answers):
  return [0.0] * len(completions)


@pytest.mark.slow  # ~45 s: two LoRA GRPO runs (the default suite has the full-parameter one of the test below)
def test_a_lora_grpo_run_logs_its_figures_saves_the_adapters_and_resumes(tmp_path):
  config = from_config_dict(_config(tmp_path, **{"grpo.rewards": "lm.training.rewards.exact_answer,tests.test_grpo._parity_reward"}))
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:2])
  logged = metrics.read_jsonl(workdir)
  assert sorted(logged) == [1, 2, 3, 4]
  for figure in ("loss", "reward_mean", "reward_std", "kl", "clip_fraction", "completion_length", "finished",
                 "flat_groups", "reward/exact_answer", "reward/_parity_reward", "grad_norm"):
    assert all(np.isfinite(row[figure]) for row in logged.values()), figure
  assert logged[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
  assert logged[4]["kl"] > 0 and logged[1]["grad_norm"] > 0  # the adapters moved away from it
  assert logged[1]["clip_fraction"] == 0.0  # one update per batch: the ratio is 1
  assert sorted(metrics.read_jsonl(workdir, "eval")) == [0, 4]
  saved = checkpoint.saved_tree(os.path.join(workdir, "checkpoints", "4", "state"))
  assert all(p.endswith(lora.SUFFIXES) for p in traverse_util.flatten_dict(saved["params"], sep="/"))
  # Resumed from step 2, steps 3 and 4 are the same to the bit: prompts, samples and updates depend on
  # the seed, the step and the state alone.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  os.remove(os.path.join(resumed, "metrics.jsonl"))
  train.train_and_evaluate(config, resumed, devices=jax.devices()[:2])
  again = metrics.read_jsonl(resumed)
  assert sorted(again) == [3, 4]
  assert all(again[s][k] == logged[s][k] for s in (3, 4) for k in ("loss", "reward_mean", "kl", "grad_norm"))


def test_grpo_raises_the_exact_match_reward_on_held_out_problems(tmp_path):
  """A tiny model first trained (100 steps) on lines of four single-digit additions ("3+4=7 5+1=6 ..."):
  it has the format and some of the sums, but it goes on after an answer, so exact match is ~0. GRPO with
  the exact-answer reward alone (30 steps, 8 prompts x 8 generations) must raise the greedy exact match on
  128 held-out problems by 0.08 or more (measured here: 0 -> 0.17 on 64 of them), mostly by ending the
  answer, and shorten the completions."""
  grpo_cfg = from_config_dict(default.get_config()).grpo
  problems = [p + a for p, a in zip(*rewards.arithmetic(0, "train", range(2000), dataclasses.replace(grpo_cfg, max_operand=9)))]
  corpus = tmp_path / "problems.txt"
  corpus.write_text("\n\n".join(" ".join(problems[i:i + 4]) for i in range(0, len(problems), 4)))

  def config(**overrides):
    c = apply_overrides(default.get_config(), TINY)
    c.mesh.data, c.mesh.fsdp = 1, 1
    c.data.data_dir = str(tmp_path / "data")
    c.data.sources.main.kind, c.data.sources.main.path = "text", str(corpus)
    c.train.micro_batch_size, c.train.gradient_accumulation_steps, c.train.peak_flops_per_device = 8, 1, 1e9
    c.grpo.max_operand = 9
    for key, value in overrides.items():
      c.train[key] = value
    return c

  sft = config(num_train_steps=100, learning_rate=3e-3, warmup_steps=10, save_interval_steps=100,
               eval_interval_steps=100, log_interval_steps=50)
  train.train_and_evaluate(from_config_dict(sft), str(tmp_path / "sft"), devices=jax.devices()[:1])
  rl = config(num_train_steps=30, learning_rate=1e-3, warmup_steps=0, schedule="constant", micro_batch_size=64,
              save_interval_steps=30, eval_interval_steps=30, log_interval_steps=10,
              init_from=str(tmp_path / "sft" / "checkpoints"))
  rl.grpo.enabled, rl.grpo.num_generations, rl.grpo.max_completion_tokens = True, 8, 4
  rl.grpo.rewards, rl.grpo.eval_prompts = "lm.training.rewards.exact_answer", 128
  train.train_and_evaluate(from_config_dict(rl), str(tmp_path / "grpo"), devices=jax.devices()[:1])
  evals = metrics.read_jsonl(str(tmp_path / "grpo"), "eval")
  before, after = evals[0]["reward/exact_answer"], evals[30]["reward/exact_answer"]
  assert after >= before + 0.08, (before, after)
  assert evals[30]["completion_length"] < evals[0]["completion_length"]


def test_num_iterations_reuses_the_completions_and_clips_the_moved_ratio(tmp_path):
  """num_iterations 2: steps 1-2 and 3-4 share their completions (the same rewards), the first step of a
  pair has ratio 1 (nothing clipped), the second has moved (at this learning rate, some tokens clipped).
  With beta 0 there is no KL figure (nor reference pass)."""
  c = _config(tmp_path, **{"grpo.rewards": "tests.test_grpo._parity_reward", "grpo.num_iterations": 2,
                           "train.learning_rate": 3e-2, "train.save_interval_steps": 4, "grpo.beta": 0.0})
  c.model.lora_rank, c.mesh.data = 0, 1
  c.train.micro_batch_size, c.train.gradient_accumulation_steps = 16, 1
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(from_config_dict(c), workdir, devices=jax.devices()[:1])
  logged = metrics.read_jsonl(workdir)
  assert [logged[s]["reward_mean"] for s in (1, 3)] == [logged[s]["reward_mean"] for s in (2, 4)]
  assert logged[1]["reward_mean"] != logged[3]["reward_mean"] or logged[1]["loss"] != logged[3]["loss"]
  assert logged[1]["clip_fraction"] == logged[3]["clip_fraction"] == 0.0
  assert logged[2]["clip_fraction"] > 0 and logged[4]["clip_fraction"] > 0
  assert not any("kl" in row for row in logged.values())  # beta 0: no KL term, no reference pass


@needs_libtpu
def test_the_grpo_step_and_its_log_probabilities_compile_for_a_tpu_slice_with_splash():
  """XLA:TPU compiles GRPO's two programs for v5e:2x4 with splash attention (Pallas kernels): the update (the
  policy loss through the train step, LoRA) and the log-probability pass of the rollout, as Sampler runs it."""
  import functools
  import jax.numpy as jnp
  from lm.model import sharding
  from lm.tools import topology
  from lm.training import runtime
  from lm.training.optimizer import make_optimizer
  config = tpu_config()
  config = dataclasses.replace(config, model=dataclasses.replace(config.model, lora_rank=4),
                               grpo=dataclasses.replace(config.grpo, enabled=True))
  rt = runtime.setup(config, topology.devices("v5e:2x4"))
  assert rt.config.model.attention == "splash"
  step, rows = rt.abstract_step_batch(), sharding.batch_sharding(rt.mesh)
  shape = step["tokens"].shape
  window = (*shape[:2], shape[2] // 2)  # the rollout's logits of each completion's positions alone
  extra = {"mask": (shape, jnp.bool_), "logit_positions": (window, jnp.int32), "old_logprobs": (window, jnp.float32),
           "ref_logprobs": (window, jnp.float32), "advantages": (shape[:2], jnp.float32)}
  batch = {**step, **{k: jax.ShapeDtypeStruct(s, d, sharding=step["tokens"].sharding) for k, (s, d) in extra.items()}}
  losses = functools.partial(grpo.policy_losses, beta=0.04, epsilon=0.2, temperature=1.0)
  with sharding.activate(rt.mesh):
    fns = runtime.train_functions(rt, make_optimizer(config.train, 10), losses=losses)
    update = fns.step_fn.lower(fns.abstract_state, batch).compile()
    row_batch = {k: jax.ShapeDtypeStruct(shape[1:], jnp.int32, sharding=rows) for k in step}
    row_batch["logit_positions"] = jax.ShapeDtypeStruct(window[1:], jnp.int32, sharding=rows)
    logprobs = jax.jit(functools.partial(train_step.token_logprobs, rt.model), in_shardings=(rt.param_sharding, rows),
                       out_shardings=rows).lower(rt.abstract_params, row_batch).compile()
  assert "tpu_custom_call" in update.as_text() and "tpu_custom_call" in logprobs.as_text()
