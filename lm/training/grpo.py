"""GRPO (Shao et al., 2024): `main.py` with config.grpo.enabled trains a policy on verifiable rewards, a kind
of training for the loop (`lm.training.train`, which does the rest: state, checkpoints, figures, eval, preemption).

Each optimizer step:
1. takes its prompts (global batch sequences / num_generations of them, fixed by the seed and the step),
2. samples num_generations completions of each with the KV-cache sampler (`lm.model.sampling.generate`),
3. rewards each completion (the config's reward functions, summed) and normalises the rewards within each
   prompt's group: advantage = (reward - group mean) / (group std + 1e-4), the sample std as TRL's,
4. takes num_iterations optimizer steps (1 by default, as TRL and Tunix) on those completions, each on the
   clipped policy-gradient loss with a KL penalty to the reference model,
   per completion token: -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon) A) + beta ratio KL, where ratio
   is the policy's probability of the token over the sampling policy's and KL the k3 estimator
   exp(ref - logp) - (ref - logp) - 1 (TRL's and Tunix's). The ratio on the KL (config.grpo.kl_bias_correction,
   TRL's use_bias_correction_kl) is 1 in value on-policy, but its gradient adds KL x the gradient of logp: the
   gradient of the KL the completions were sampled under, where that of k3 alone is biased (DeepSeek-V3.2,
   section 3.1). The loss is the mean over every completion token
   of the step, summed over micro-batches and devices exactly as pre-training sums its tokens
   (`lm.training.train_step.train_step` with this module's `policy_losses`).

The reference model is the one the run starts from: with LoRA the base alone (the adapters at zero: no
copy of the weights), else a copy of the starting parameters; with beta 0 there is none (no KL term, no
reference pass). With one update per batch of completions the old log-probabilities are the update's own,
held constant (the ratio is exactly 1; no forward pass of the sampling policy, as TRL); from the second of
num_iterations updates on, they are the sampling policy's (a pass per rollout) and the clip bounds the step.

Prompts of different lengths are left-padded for the sampler (`lm.model.sampling.generate`'s
prompt_lengths_B) and packed from position 0 for the update. With LoRA the sampler decodes with the adapters
folded into the weights (`lm.model.lora.fold`, once per rollout).

Several processes: each samples the prompts of its own rows of the step (`lm.data.batching.step_rows`; a
prompt's group never spans processes, checked at startup) in one sampler batch of all rows on the whole mesh,
ordered so that each row has the place, and so the random draws, it has in one process (`by_device`); it
rewards its groups (advantages are per group: exact) and scores its log-probabilities; the rewards and lengths
logged, and eval's, are gathered from every process (`gather_rows`): the figures of one process.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lm import console
from lm.checkpoints import param_files
from lm.config import Config, GRPOConfig
from lm.data import batching, corpus
from lm.data import chat as lm_chat
from lm.errors import ConfigError, TrainingError
from lm.model import lora, sampling, sharding
from lm.model.decoder import Decoder
from lm.training import runtime
from lm.training.train_step import token_logprobs


def policy_losses(model: Decoder, params, batch, *, beta: float, epsilon: float, temperature: float,
                  kl_bias_correction: bool = True) -> dict:
  """Per completion: the clipped policy-gradient loss with the KL penalty summed over its tokens, their
  count, the KL sum (with beta > 0) and the number of tokens whose objective was clipped. Log-probabilities
  are those of the sampling distribution (logits / temperature), as TRL's. With `kl_bias_correction` the KL
  term is weighed by the ratio, as TRL's default: the same value, the unbiased gradient.

  Without `old_logprobs` in the batch (num_iterations 1: the completions were sampled by this very policy)
  the old log-probabilities are the current ones, held constant: the ratio is exactly 1 and its gradient
  that of the log-probability, as TRL's detached copy, with no forward pass of its own. Without
  `ref_logprobs` (beta 0) there is no KL term and no reference pass."""
  logp_BxL = token_logprobs(model, params, batch, temperature)
  mask_BxL = batch["mask"]
  if "logit_positions" in batch:  # the log-probabilities are of each row's completion window alone
    mask_BxL = jnp.take_along_axis(mask_BxL, batch["logit_positions"], axis=1)
  old_BxL = batch["old_logprobs"] if "old_logprobs" in batch else jax.lax.stop_gradient(logp_BxL)
  ratio_BxL = jnp.exp(logp_BxL - old_BxL)
  advantage_Bx1 = batch["advantages"][:, None]
  unclipped, clipped = ratio_BxL * advantage_Bx1, jnp.clip(ratio_BxL, 1 - epsilon, 1 + epsilon) * advantage_Bx1
  per_token_BxL = -jnp.minimum(unclipped, clipped)

  def total(x_BxL):
    return jnp.sum(jnp.where(mask_BxL, x_BxL, 0), axis=-1)
  figures = {"sequence_tokens": total(jnp.ones_like(mask_BxL, jnp.int32)),
             "sequence_clipped": total((clipped < unclipped).astype(jnp.int32))}
  if "ref_logprobs" in batch:
    ref_BxL = batch["ref_logprobs"]
    if "at_reference" in batch:  # the policy is the reference: its own log-probabilities, so that the KL and
      # its gradient are exactly 0 (a reference pass, another program, rounds otherwise: `Sampler._at_reference`)
      ref_BxL = jnp.where(batch["at_reference"][:, None], jax.lax.stop_gradient(logp_BxL), ref_BxL)
    log_ratio_ref_BxL = ref_BxL - logp_BxL
    kl_BxL = jnp.exp(log_ratio_ref_BxL) - log_ratio_ref_BxL - 1
    figures["sequence_kl"] = total(kl_BxL)  # the KL to the reference, whatever the weighing
    per_token_BxL = per_token_BxL + beta * (kl_BxL * ratio_BxL if kl_bias_correction else kl_BxL)
  return {"sequence_loss": total(per_token_BxL), **figures}


def load_function(name: str, key: str) -> Callable:
  """`module.function` of config.grpo.<key>, imported; a clear error when it cannot be."""
  module, _, attribute = name.strip().rpartition(".")
  try:
    function = getattr(importlib.import_module(module), attribute)
  except (ImportError, AttributeError, ValueError) as e:
    raise ConfigError(f"config.grpo.{key}: {name!r} cannot be imported ({type(e).__name__}: {e}). Name a "
                      "function as module.function, importable from the working directory (e.g. "
                      "lm.training.rewards.exact_answer).") from e
  if not callable(function):
    raise ConfigError(f"config.grpo.{key}: {name!r} is not a function.")
  return function


PROMPT_BUCKET = 16  # prompt widths are rounded up to a multiple of this: one sampler program per bucket


@dataclasses.dataclass(frozen=True)
class Task:
  """Prompts, answers and rewards of a GRPO run, as token ids."""
  cfg: GRPOConfig
  seed: int
  tokenizer: object
  problems: Callable  # (seed, split, indices, cfg) -> (prompts, answers)
  rewards: dict[str, Callable]  # name -> reward(completions, answers)
  chat: lm_chat.Chat | None = None  # config.grpo.chat: the model's template renders each prompt
  max_width: int = 0  # prompts are left-padded to a multiple of PROMPT_BUCKET up to this (0: no cap)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Where a completion ends: the chat's end-of-turn ids (and end of document), else the end of document."""
    if self.chat is not None:
      return self.chat.stop_ids
    return () if self.tokenizer.eos_id is None else (self.tokenizer.eos_id,)

  def prompts(self, split: str, indices) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(prompt tokens [len(indices), width] int32, left-padded with 0, their lengths, answers). A prompt is
    the user's message rendered with the chat template (config.grpo.chat: the ids of `sample.py --chat`),
    else framed as the tokenizer frames an input (its BOS or post-processor). The width is the longest
    prompt's rounded up to a multiple of PROMPT_BUCKET, so that the sampler compiles once per bucket, not
    once per prompt length."""
    texts, answers = self.problems(self.seed, split, indices, self.cfg)
    if self.chat is None:
      ids = self.tokenizer.encode_batch(texts, framed=True)
    else:
      system = self.cfg.system_prompt or None
      ids = [self.tokenizer.encode_special(self.chat.render(lm_chat.messages(t, system))) for t in texts]
    lengths = np.asarray([len(i) for i in ids], np.int32)
    if not lengths.min():
      raise TrainingError(f"config.grpo.task = {self.cfg.task!r} gave an empty prompt (no tokens, and the tokenizer "
                          "adds none): a completion needs a prompt to follow.")
    longest = int(lengths.max())
    width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    padded = np.zeros((len(ids), max(min(width, self.max_width or width), longest)), np.int32)
    for row, i in zip(padded, ids):
      row[len(row) - len(i):] = i
    return padded, lengths, answers

  def score(self, completions: list[str], answers: list[str]) -> dict[str, np.ndarray]:
    """Each reward function's rewards, checked: one finite float per completion."""
    scores = {}
    for name, reward in self.rewards.items():
      try:
        values = np.asarray(reward(completions, answers), np.float64)
      except (TypeError, ValueError) as e:
        raise TrainingError(f"config.grpo.rewards: {name} did not return numbers ({e}).") from e
      if values.shape != (len(completions),) or not np.all(np.isfinite(values)):
        raise TrainingError(f"config.grpo.rewards: {name} returned {values.shape} values for "
                            f"{len(completions)} completions (or a non-finite one); a reward function returns one "
                            "finite float per completion.")
      scores[name] = values
    return scores


def make_task(config: Config, tokenizer) -> Task:
  """The config's task and rewards, imported and tried on two problems (errors at startup, not mid-run)."""
  g = config.grpo
  task = Task(g, config.train.seed, tokenizer, load_function(g.task, "task"),
              {name.strip(): load_function(name, "rewards") for name in g.rewards.split(",") if name.strip()},
              chat=corpus.load_chat(config.data, tokenizer) if g.chat else None,
              max_width=config.train.seq_len - g.max_completion_tokens)
  prompts, lengths, answers = task.prompts("train", [0, 1])
  try:
    task.score(answers, answers)
  except TrainingError as e:
    raise ConfigError(str(e)) from e
  if lengths.max() + g.max_completion_tokens > config.train.seq_len:
    raise ConfigError(f"The prompts ({lengths.max()} tokens) + config.grpo.max_completion_tokens = "
                      f"{g.max_completion_tokens} are longer than config.train.seq_len = {config.train.seq_len}: "
                      "raise train.seq_len or lower max_completion_tokens. (Checked on the task's first prompts; a "
                      "longer one later stops the run.)")
  return task


def completions_of(new_BxT: np.ndarray, stop_ids: tuple[int, ...]) -> tuple[list[list[int]], np.ndarray]:
  """(each row's completion: its tokens up to and with its first stop id, their count)."""
  rows = []
  for row in new_BxT.tolist():
    end = next((i for i, token in enumerate(row) if token in stop_ids), None)
    rows.append(row if end is None else row[:end + 1])
  return rows, np.asarray([len(r) for r in rows])


def complete(new_BxT: np.ndarray, tokenizer, stop_ids: tuple[int, ...]
             ) -> tuple[list[list[int]], list[str], dict[str, np.ndarray]]:
  """Sampled rows as the rewards see them: (each row's completion, its text without the stop ids, {"lengths",
  "finished": whether it ended by itself, with a stop id within the tokens sampled})."""
  completions, lengths = completions_of(new_BxT, stop_ids)
  texts = [tokenizer.decode([t for t in c if t not in stop_ids]) for c in completions]
  finished = np.asarray([bool(c) and c[-1] in stop_ids for c in completions])
  return completions, texts, {"lengths": lengths, "finished": finished}


def per_reward(rewards: dict[str, np.ndarray]) -> dict[str, float]:
  """Each reward function's mean, logged apart (`reward/<function>`): a rise of the format reward alone shows."""
  return {f"reward/{name.rpartition('.')[2]}": float(v.mean()) for name, v in rewards.items()}


def advantages(rewards: np.ndarray, group: int) -> np.ndarray:
  """(reward - its group's mean) / (the group's standard deviation + 1e-4), groups of `group` rows; the sample
  standard deviation (Bessel's correction), as TRL's GRPOTrainer."""
  by_group = rewards.reshape(-1, group)
  std = by_group.std(1, keepdims=True, ddof=1)
  return ((by_group - by_group.mean(1, keepdims=True)) / (std + 1e-4)).reshape(-1)


def assemble(prompts_BxP: np.ndarray, lengths_B: np.ndarray, completions: list[list[int]],
             seq_len: int, window: int = 0) -> dict[str, np.ndarray]:
  """Rows prompt (its last lengths_B[b] tokens: without the left padding) + completion, padded to seq_len;
  `mask` marks the positions whose target is a completion token (the loss and its token count). With a
  `window` (`Sampler.window`: max_completion_tokens), `logit_positions` [B, window]: consecutive positions from
  the one before the completion (moved back where the window would run past seq_len) that hold every masked
  one: the only positions whose logits the update and the reference compute (`token_logprobs`)."""
  B, width = prompts_BxP.shape
  tokens = np.zeros((B, seq_len), np.int32)
  mask = np.zeros((B, seq_len), np.bool_)
  segment_ids = np.zeros((B, seq_len), np.int32)
  for i, (P, completion) in enumerate(zip(lengths_B, completions)):
    n = len(completion)
    if P + n > seq_len:
      raise TrainingError(f"A prompt of {P} tokens + its completion of {n} is longer than config.train.seq_len "
                          f"= {seq_len}: raise train.seq_len or lower config.grpo.max_completion_tokens.")
    tokens[i, :P], tokens[i, P:P + n] = prompts_BxP[i, width - P:], completion
    segment_ids[i, :P + n] = 1
    mask[i, P - 1:P - 1 + n] = True
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (B, seq_len)).copy()
  out = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions, "mask": mask}
  if window:
    if window > seq_len:
      raise ValueError(f"a window of {window} positions in rows of {seq_len}")
    start_B = np.minimum(np.asarray(lengths_B) - 1, seq_len - window).astype(np.int32)
    out["logit_positions"] = start_B[:, None] + np.arange(window, dtype=np.int32)
  return out


def by_device(rows: np.ndarray, plan: batching.BatchPlan) -> np.ndarray:
  """Rows of a step's batch (positions) in the order of the sampler's batch: device by device, each device's
  rows of every micro-batch together. Split over the batch axes, the sampler's batch of all rows in this order
  gives each device the rows it trains on, and each row its place (its random draws) whatever the processes."""
  micro, within = np.divmod(rows, plan.micro_rows)
  device, k = np.divmod(within, plan.micro_batch_size)
  return rows[np.lexsort((k, micro, device))]


def gather_rows(arrays: dict[str, np.ndarray], rows: np.ndarray, total: int) -> dict[str, np.ndarray]:
  """Per-row host arrays of which each process holds `rows` (positions of `total`, as many on every process;
  a replica's the same), every process's, each row at its position: what one process would hold. Exchanged
  as bytes, so float64 stays exact (JAX would round it to float32)."""
  columns = [np.asarray(rows, np.int64), *arrays.values()]
  raw = [np.ascontiguousarray(c).reshape(len(rows), -1).view(np.uint8) for c in columns]
  mine = np.concatenate(raw, axis=1)
  everyone = np.asarray(multihost_utils.process_allgather(mine)) if jax.process_count() > 1 else mine[None]
  everyone = everyone.reshape(-1, mine.shape[1])
  bounds = np.cumsum([0] + [r.shape[1] for r in raw])
  positions, *values = [np.ascontiguousarray(everyone[:, a:b]).view(c.dtype).reshape(-1, *c.shape[1:])
                        for c, a, b in zip(columns, bounds, bounds[1:])]
  out = {}
  for name, value in zip(arrays, values):
    out[name] = np.empty((total, *value.shape[1:]), value.dtype)
    out[name][positions] = value
  return out


@dataclasses.dataclass(frozen=True)
class Rollout:
  """One step's completions: this process's rows of the step's batch (prompt + completion, advantages,
  log-probabilities of the sampling policy and the reference) and what the log reports of all of them."""
  batch: dict[str, np.ndarray]
  rewards: dict[str, np.ndarray]  # per reward function, per row of the step (every process's)
  lengths: np.ndarray  # completion tokens per row of the step (every process's)
  finished: np.ndarray  # whether each row's completion ended by itself, with a stop id (every process's)
  seconds: float


class Sampler:
  """Completions of the step's prompts (and greedy ones of held-out prompts) with the KV cache. Each process
  samples the prompts of its rows of the step (whole groups: `check_groups`) in one batch of all rows on the
  whole mesh, and rewards them; the figures are every process's."""

  def __init__(self, rt: runtime.Runtime, task: Task):
    self.rt, self.task, self.g = rt, task, rt.config.grpo
    tokenizer = task.tokenizer
    self.stop_ids = task.stop_ids
    self.num_ids = tokenizer.vocab_size if tokenizer.vocab_size < rt.config.model.vocab_size else 0
    rows = sharding.batch_sharding(rt.mesh)
    self._logprobs = jax.jit(functools.partial(token_logprobs, rt.model, temperature=self.g.temperature),
                             in_shardings=(rt.param_sharding, rows), out_shardings=rows)
    cfg = rt.config.model
    # With LoRA the sampler decodes with the adapters folded into the weights, once per rollout: none of their
    # matmuls in each decoding step (the adapted model's function, up to rounding).
    self._decoder, self._fold = rt.model, lambda params: params
    if cfg.lora_rank:
      self._decoder = Decoder(dataclasses.replace(cfg, lora_rank=0))
      self._fold = jax.jit(functools.partial(lora.fold, cfg=cfg), in_shardings=(rt.param_sharding,),
                           out_shardings=lora.split(rt.param_sharding)[0])
    self._unchanged = jax.jit(lora.no_change)
    self._same = jax.jit(lambda params, reference: jnp.all(jnp.stack(jax.tree.leaves(
        jax.tree.map(lambda a, b: jnp.array_equal(a, b), params, reference)))))
    self._mine = batching.step_rows(rt.mesh, rt.plan)  # this process's rows of every step's batch, ascending
    # The positions whose logits the update and the reference compute: max_completion_tokens of them, rounded
    # up to whole chunks where the logits come in chunks (config.model.logits_chunk then divides seq_len, so
    # the rounded window still fits a row).
    chunk, self.window = cfg.logits_chunk, self.g.max_completion_tokens
    if chunk and self.window > chunk:
      self.window = -(-self.window // chunk) * chunk

  def _generate(self, params, prompts_BxP, lengths_B, rng, temperature: float, rows: int) -> np.ndarray:
    """New tokens of this process's rows (`sharding.process_rows`) of a sampler batch of `rows` rows, whose
    prompts are given; sampled on the whole mesh."""
    mesh = self.rt.mesh
    placed = sharding.put_batch({"prompts": prompts_BxP, "lengths": lengths_B}, mesh, rows)
    with jax.set_mesh(mesh):  # the mesh without the logical rules, as scripts/sample.py decodes
      new_BxT = sampling.generate(
          self._fold(params), placed["prompts"], rng, model=self._decoder, max_new_tokens=self.g.max_completion_tokens,
          sampling=sampling.SamplingConfig(temperature=temperature), stop_ids=self.stop_ids, num_ids=self.num_ids,
          prompt_lengths_B=placed["lengths"])
    return sharding.get_batch(new_BxT, mesh)

  def rollout(self, state, reference, step: int) -> Rollout:
    """The completions of rollout `step` (from 0; the optimizer step / num_iterations): its prompts depend
    on the seed and the step, the sampling on the seed, the step and the policy. Every process renders all
    the step's prompts (one width, as one process pads them) and samples those of its rows."""
    started, plan, group = time.perf_counter(), self.rt.plan, self.g.num_generations
    count = plan.global_sequences // group
    prompts, prompt_lengths, answers = self.task.prompts("train", range(step * count, (step + 1) * count))
    mine, order = self._mine, by_device(self._mine, plan)
    rng = jax.random.fold_in(jax.random.key(self.rt.config.train.seed), step)
    new_BxT = self._generate(state.model_params, prompts[order // group], prompt_lengths[order // group], rng,
                             self.g.temperature, plan.global_sequences)
    # in the step's order: this process's rows
    completions, texts, shape = complete(new_BxT[np.argsort(order)], self.task.tokenizer, self.stop_ids)
    rewards = self.task.score(texts, [answers[p] for p in mine // group])
    batch = assemble(prompts[mine // group], prompt_lengths[mine // group], completions, plan.seq_len,
                     window=self.window)
    batch["advantages"] = advantages(sum(rewards.values()), group).astype(np.float32)
    at_reference = self._at_reference(state, reference)
    if self.g.beta > 0:
      batch["at_reference"] = np.full(len(mine), at_reference)
      if at_reference:  # no reference pass: the update takes the policy's own log-probabilities
        batch["ref_logprobs"] = np.zeros(batch.get("logit_positions", batch["tokens"]).shape, np.float32)
    for name, weights in self._scored_by(state, reference, at_reference):
      with sharding.activate(self.rt.mesh):  # the training layout (and splash attention under shard_map)
        batch[name] = np.concatenate([
            sharding.get_batch(self._logprobs(weights, sharding.put_batch(micro, self.rt.mesh, plan.micro_rows)),
                               self.rt.mesh) for micro in _micro(batch, len(mine) // plan.accumulation_steps)])
    everyone = gather_rows({**shape, **rewards}, mine, plan.global_sequences)
    return Rollout(batch, {k: everyone[k] for k in rewards}, everyone["lengths"], everyone["finished"],
                   time.perf_counter() - started)

  def _at_reference(self, state, reference) -> bool:
    """Whether the policy is the reference itself, as at a run's start (LoRA: B = 0; else the reference is a
    copy of the parameters). Its log-probabilities from a reference pass, a program of their own, would differ
    from the update's by rounding: with zero advantages (every group's rewards equal) the gradient would be that
    rounding, and Adam would blow it up into a step of as much as the learning rate on some weights. TRL's
    eager reference pass rounds as its policy's does, and its step is exactly zero there."""
    if self.g.beta == 0:
      return False
    if reference is None:
      return bool(self._unchanged(state.params))
    return bool(self._same(state.params, reference))

  def _scored_by(self, state, reference, at_reference: bool) -> list[tuple[str, object]]:
    """The forward passes a rollout needs besides sampling: the sampling policy's log-probabilities only when
    they are reused by later updates (num_iterations > 1), the reference's only with a KL term (beta > 0) and a
    policy that is not the reference itself."""
    passes = [("old_logprobs", state.model_params)] if self.g.num_iterations > 1 else []
    if self.g.beta > 0 and not at_reference:
      if reference is None:  # LoRA: the reference is the base, the adapters at zero
        reference = lora.merge(state.frozen, jax.tree.map(jnp.zeros_like, state.params))
      passes.append(("ref_logprobs", reference))
    return passes

  def evaluate(self, state) -> dict[str, float]:
    """Mean rewards of greedy completions of the held-out prompts, their length and the share that ended by
    themselves (a stop id within max_completion_tokens). The prompts are split over the processes as a
    batch's rows (padded with copies of the last prompt to a multiple of the data-parallel devices; those not
    counted)."""
    count, parallel, mesh = self.g.eval_prompts, self.rt.plan.data_parallel, self.rt.mesh
    prompts, prompt_lengths, answers = self.task.prompts("eval", range(count))
    rows = -(-count // parallel) * parallel
    mine = sharding.process_rows(mesh, rows)
    prompt_of = np.minimum(mine, count - 1)
    new_BxT = self._generate(state.model_params, prompts[prompt_of], prompt_lengths[prompt_of], jax.random.key(0),
                             0.0, rows)
    _, texts, shape = complete(new_BxT, self.task.tokenizer, self.stop_ids)
    rewards = self.task.score(texts, [answers[p] for p in prompt_of])
    everyone = {k: v[:count] for k, v in gather_rows({**shape, **rewards}, mine, rows).items()}
    rewards = {k: everyone[k] for k in rewards}
    return {"reward": float(np.mean(sum(rewards.values()))), "completion_length": float(everyone["lengths"].mean()),
            "finished": float(everyone["finished"].mean()), **per_reward(rewards)}


def _micro(batch: dict[str, np.ndarray], rows: int):
  """The micro-batches of the token arrays of a step's rows (a process's), in order."""
  keys = [k for k in ("tokens", "segment_ids", "positions", "logit_positions") if k in batch]
  for start in range(0, len(batch["tokens"]), rows):
    yield {k: batch[k][start:start + rows] for k in keys}


def check_groups(rt: runtime.Runtime, group: int) -> None:
  """Each process samples and rewards whole groups: the rows of a prompt's completions all on the processes
  that hold any of them (`batching.step_rows`), else a ConfigError naming the fix."""
  mesh, plan = rt.mesh, rt.plan
  held_PxR = np.zeros((jax.process_count(), plan.global_sequences), bool)
  for p in range(jax.process_count()):
    held_PxR[p, batching.step_rows(mesh, plan, [d for d in mesh.devices.flat if d.process_index == p])] = True
  by_group = held_PxR.reshape(len(held_PxR), -1, group)
  split = np.flatnonzero((by_group.any(-1) & ~by_group.all(-1)).any(0))
  if len(split):
    per_process = len(sharding.process_rows(mesh, plan.micro_rows))
    devices = per_process // plan.micro_batch_size
    raise ConfigError(
        f"config.grpo.num_generations = {group}: the completions of prompt {split[0]} of a step would be sampled on "
        f"two processes (each holds {per_process} of the {plan.micro_rows} rows of a micro-batch: "
        f"micro_batch_size {plan.micro_batch_size} x {devices} data-parallel devices), but each process rewards "
        "whole groups. Make the rows per process a multiple of num_generations: set config.train.micro_batch_size "
        f"to a multiple of {group // math.gcd(devices, group)}, or change num_generations.")


class GRPO:
  """GRPO as a kind of training for the loop (`lm.training.train`): rollouts as its batches, the policy loss, the
  rewards of greedy completions of held-out prompts as its eval."""
  steps_per_epoch = None  # a task's prompts have no epochs: config.train.num_train_steps counts the steps
  evaluate_first = True  # the rewards of the model the run starts from
  on_policy = True  # its completions are sampled from the state

  def __init__(self, rt: runtime.Runtime, sampler: Sampler):
    g = rt.config.grpo
    self.rt, self.sampler, self.g = rt, sampler, g
    self.losses = functools.partial(policy_losses, beta=g.beta, epsilon=g.epsilon, temperature=g.temperature,
                                    kl_bias_correction=g.kl_bias_correction)
    self.reference = None  # the KL's reference: the starting parameters (None with LoRA: the base alone)
    self._rollout: Rollout | None = None

  def describe(self) -> list[tuple[str, str]]:
    g, plan = self.g, self.rt.plan
    rows = len(batching.step_rows(self.rt.mesh, plan))
    return [("Mode", f"GRPO: {plan.global_sequences // g.num_generations} prompts x {g.num_generations} "
                     f"generations = {plan.global_sequences} completions per optimizer step, at most "
                     f"{g.max_completion_tokens} tokens each, temperature {g.temperature:g}; beta {g.beta:g}"
                     f"{' (KL x ratio: its unbiased gradient)' if g.beta and g.kl_bias_correction else ''}, "
                     f"epsilon {g.epsilon:g}, {g.num_iterations} update(s) per batch of completions"),
            ("Task", f"{g.task}, rewards {g.rewards}; eval: {g.eval_prompts} held-out prompts, greedy"),
            *([("Sampling", f"each process samples and rewards the {rows // g.num_generations} prompts of its {rows} "
                            "rows of a step on the whole mesh; the figures are of all processes")]
              if jax.process_count() > 1 else [])]

  def start(self, fns: runtime.TrainFunctions, state, resumed: bool) -> None:
    """Keeps the parameters the run started from, a copy of their own (with LoRA, the base is the state's)."""
    t = self.rt.config.train
    if fns.lora or self.g.beta == 0:  # the base is the state's; no KL term, no reference
      self.reference = None
    elif not resumed:
      self.reference = jax.tree.map(jnp.copy, state.params)
    else:
      self.reference = (param_files.restore_params(t.init_from, fns.abstract_base) if t.init_from
                        else fns.create_state().params)

  def batch(self, step: int, state) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The step's completions (sampled anew every num_iterations steps) as micro-batches, their figures."""
    iterations = self.g.num_iterations
    if self._rollout is None or step % iterations == 0:
      if step % iterations:
        console.logger.warning("Resumed inside a group of config.grpo.num_iterations = %d steps: the "
                               "completions of steps %d-%d are sampled again, from the resumed policy.",
                               iterations, step + 1, (step // iterations + 1) * iterations)
      self._rollout = self.sampler.rollout(state, self.reference, step // iterations)
    out = self._rollout
    total = sum(out.rewards.values())
    figures = {"reward_mean": float(total.mean()), "reward_std": float(total.std()),
               "completion_length": float(out.lengths.mean()), "finished": float(out.finished.mean()),
               "flat_groups": float(np.mean(np.ptp(total.reshape(-1, self.g.num_generations), axis=1) == 0)),
               "generation_seconds": out.seconds,
               **per_reward(out.rewards)}
    return batching.micro_batches(out.batch, self.rt.plan), figures

  def figures(self, fetched: dict, tokens: int) -> dict[str, float]:
    """The KL to the reference (with beta > 0) and the fraction of clipped tokens, per completion token."""
    figures = {"clip_fraction": float(np.sum(fetched["sequence_clipped"])) / max(tokens, 1)}
    if "sequence_kl" in fetched:
      figures["kl"] = float(np.sum(fetched["sequence_kl"], dtype=np.float64)) / max(tokens, 1)
    return figures

  def evaluate(self, state) -> dict[str, float]:
    return self.sampler.evaluate(state)


def make(rt: runtime.Runtime) -> GRPO:
  """The config's task and sampler, checked against the batch (errors at startup, not mid-run)."""
  config, g = rt.config, rt.config.grpo
  if rt.plan.global_sequences % g.num_generations:
    raise ConfigError(f"The global batch of {rt.plan.global_sequences} sequences (micro_batch_size x "
                      f"accumulation x {rt.plan.data_parallel} data-parallel devices) is not a multiple of "
                      f"config.grpo.num_generations = {g.num_generations}: each prompt's completions form one "
                      "group of a step. Change the batch or num_generations.")
  check_groups(rt, g.num_generations)
  if not config.train.num_train_steps:
    raise ConfigError(f"config.train.num_train_steps = 0 with config.train.num_epochs = {config.train.num_epochs}: "
                      "a GRPO task's prompts have no epochs (it draws as many as the steps ask for). Set "
                      "config.train.num_train_steps.")
  return GRPO(rt, Sampler(rt, make_task(config, corpus.load_tokenizer(config.data, config.model.vocab_size))))
