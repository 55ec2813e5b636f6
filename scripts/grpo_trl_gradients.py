"""GRPO's update, the project's against TRL's GRPOTrainer on the same completions: one step's loss and LoRA
gradient, or the adapters after several optimizer steps.

  python scripts/grpo_trl_gradients.py [--import_dir=ckpt/smollm2] [--prompts=4 --generations=4 --tokens=64]
  python scripts/grpo_trl_gradients.py --train_steps=4

The import's model (scripts/convert_hf.py import) is exported to a Hugging Face directory; both sides get the
same adapters (A random as the project initialises it, B random too, so that the policy is off the reference
and the KL term has a gradient), the same prompts of configs/imported_grpo.py's task in the chat template,
the same completions (sampled by the project at the task's temperature, some ending with the end of the turn,
some truncated) and the same advantages. TRL's side is tests/trl_reference.py under .venv-hf: its own
`compute_loss` on inputs laid out as its `_generate_and_score_completions` lays them out. Prints the loss of
both, the largest difference of the per-token log-probabilities, and the relative error of each adapter's
gradient (max |ours - theirs| / max |theirs|): whether an optimizer step of the two would be the same.

--train_steps=N: N optimizer steps of each side with configs/imported_grpo.py's optimizer (the project's
`optimizer.make_optimizer`; TRL's Trainer: AdamW, the clip by global norm), from the adapters a run starts
with (B = 0), a batch of completions per step (its prompts' completions sampled from the base, random
advantages: the same batches whatever the policy, so that the two can be compared step for step). Prints each
step's loss of both and how far apart the adapters' changes end (`compare_training`).

--replay=DIR: the batches a TRL run trained on (scripts/trl_grpo.py saves them, with the adapters it started
and ended with), through the project's update from TRL's starting adapters: each step's loss, how far the
adapters end from TRL's, and the project's greedy eval of both (the held-out problems of config.train.seed 0,
all of them read from the run's spec.json: its seed, completion length, held-out problems, optimizer).

--sampling=DIR: whether a TRL run's completions were drawn from the policy that sampled them (its adapters at
the step's start, scripts/trl_grpo.py's trl_policies.npz) at the temperature: per step, the mean over the
completion tokens of log p(token) + H, the entropy of the token's distribution (the project's forward pass).
Tokens drawn from the distribution make it 0 in expectation; the standard error comes with it.

--loop=N: N optimizer steps of the project's own GRPO loop (`train.train_and_evaluate` of configs/imported_grpo.py
with --prompts, --generations, --tokens, --seed), each step's rollout and the adapters that sampled it recorded:
the same figure for the project's sampler, and the adapters the loop ends with against `project_train`'s (the
update checked against TRL's above) from the loop's first adapters on the loop's own rollouts.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import linen as nn  # noqa: E402

from lm.config import ModelConfig, TrainConfig  # noqa: E402
from lm.data import batching  # noqa: E402
from lm.model import lora, sampling  # noqa: E402
from lm.model.decoder import Decoder, output_logits, output_weight  # noqa: E402
from lm.tools.hf import from_peft, to_peft  # noqa: E402
from lm.training import grpo, optimizer, train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_PYTHON = os.path.join(ROOT, ".venv-hf", "bin", "python")


def random_adapters(cfg: ModelConfig, seed: int, b_std: float) -> dict:
  """Adapters for every target of `cfg`: A ~ N(0, 1/fan_in) as the project initialises it, B ~ N(0, b_std)
  (B = 0 would leave the policy at the reference: no KL and no gradient of A)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), *(jnp.zeros((1, 1), jnp.int32),) * 3))
  adapters = lora.split(nn.unbox(shapes["params"]))[1]

  def draw(path, shape):
    name = jax.tree_util.keystr(path)
    if name.endswith("_lora_a']"):
      fan_in = int(np.prod(shape.shape[1:-1]))
      return (rng.standard_normal(shape.shape) * fan_in ** -0.5).astype(np.float32)
    return (rng.standard_normal(shape.shape) * b_std).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, adapters)


def left_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Prompts as `grpo.assemble` takes them: left-padded with 0 to the longest [B, width], and their lengths."""
  lengths = np.asarray([len(p) for p in prompts])
  padded = np.zeros((len(prompts), int(lengths.max())), np.int32)
  for row, p in zip(padded, prompts):
    row[len(row) - len(p):] = p
  return padded, lengths


def step_batch(cfg: ModelConfig, base, adapters, prompts: list[list[int]], completions: list[list[int]],
               advantages, settings: dict) -> dict:
  """These completions as a rollout hands them to the update (one micro-batch): `grpo.assemble` with the
  logits of the completions' positions alone (`logit_positions`), the reference's log-probabilities (the
  base: the adapters at zero) and the advantages."""
  padded, lengths = left_padded(prompts)
  seq_len = int(max(len(p) + len(c) for p, c in zip(prompts, completions)))
  batch = grpo.assemble(padded, lengths, completions, seq_len, window=max(len(c) for c in completions))
  zeros = jax.tree.map(jnp.zeros_like, adapters)
  batch["ref_logprobs"] = np.asarray(_logprobs(cfg, settings["temperature"])(lora.merge(base, zeros), batch))
  batch["advantages"] = np.asarray(advantages, np.float32)
  return batch


@functools.cache
def _logprobs(cfg: ModelConfig, temperature: float):
  return jax.jit(functools.partial(train_step.token_logprobs, Decoder(cfg), temperature=temperature))


@functools.cache
def _gradient(cfg: ModelConfig, settings: tuple):
  """`train_step.gradient` of `grpo.policy_losses`, the loss sum scaled by the step's completion tokens."""
  s = dict(settings)
  losses = functools.partial(grpo.policy_losses, beta=s["beta"], epsilon=s["epsilon"], temperature=s["temperature"],
                             kl_bias_correction=s.get("kl_bias_correction", True))
  model = Decoder(cfg)
  return jax.jit(lambda adapters, base, batch: train_step.gradient(
      model, adapters, base, batch, train_step.loss_scale(batch), losses))


def project_step(cfg: ModelConfig, base, adapters, prompts: list[list[int]], completions: list[list[int]],
                 advantages, settings: dict) -> dict:
  """The project's loss, per-token log-probabilities and adapter gradient of one GRPO step on these
  completions, as train_step computes them."""
  batch = step_batch(cfg, base, adapters, prompts, completions, advantages, settings)
  grads, figures = _gradient(cfg, tuple(sorted(settings.items())))(adapters, base, batch)
  logps = np.asarray(_logprobs(cfg, settings["temperature"])(lora.merge(base, adapters), batch))
  loss = float(np.sum(np.asarray(figures["sequence_loss"], np.float64)) * float(train_step.loss_scale(batch)))
  lengths = np.asarray([len(p) for p in prompts])
  starts = lengths - 1 - batch["logit_positions"][:, 0]  # where each completion starts in its window
  rows = [logps[i, s:s + len(c)] for i, (s, c) in enumerate(zip(starts, completions))]
  return {"loss": loss, "logps": rows, "grads": to_peft(grads)}


def project_train(cfg: ModelConfig, base, adapters, steps: list[dict], settings: dict,
                  train_cfg: TrainConfig) -> dict:
  """The adapters after an optimizer step (`optimizer.make_optimizer` of `train_cfg`) on each batch of
  `steps` ({"prompts", "completions", "advantages"}) in turn, as PEFT's parameters, and each step's loss. Each
  batch is a step's one micro-batch (train_cfg's gradient_accumulation_steps aside)."""
  tx = optimizer.make_optimizer(dataclasses.replace(train_cfg, gradient_accumulation_steps=1), len(steps))
  state, losses = tx.init(adapters), []
  gradient = _gradient(cfg, tuple(sorted(settings.items())))
  for step in steps:
    batch = step_batch(cfg, base, adapters, step["prompts"], step["completions"], step["advantages"], settings)
    grads, figures = gradient(adapters, base, batch)
    losses.append(float(np.sum(np.asarray(figures["sequence_loss"], np.float64)) * float(train_step.loss_scale(batch))))
    updates, state = tx.update(grads, state, adapters)
    adapters = optax.apply_updates(adapters, updates)
  return {"adapters": to_peft(adapters), "losses": losses}


def _run_reference(hf_dir: str, out: str, adapters, settings: dict, inputs: dict) -> None:
  """tests/trl_reference.py under .venv-hf from these adapters, on `inputs` (one batch, or "steps")."""
  os.makedirs(out, exist_ok=True)
  np.savez(os.path.join(out, "adapters.npz"), **to_peft(adapters))
  spec = {"model": hf_dir, "out": out, "adapters": os.path.join(out, "adapters.npz"), "settings": settings, **inputs}
  with open(os.path.join(out, "spec.json"), "w") as f:
    json.dump(spec, f)
  run = subprocess.run([HF_PYTHON, os.path.join(ROOT, "tests", "trl_reference.py"), os.path.join(out, "spec.json")],
                       capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  if run.returncode:
    raise RuntimeError(f"tests/trl_reference.py failed:\n{run.stderr[-4000:]}")


def _plain(step: dict) -> dict:
  return {"prompts": [list(map(int, p)) for p in step["prompts"]],
          "completions": [list(map(int, c)) for c in step["completions"]],
          "advantages": [float(a) for a in step["advantages"]]}


def trl_step(hf_dir: str, out: str, adapters, prompts, completions, advantages, settings: dict) -> dict:
  """TRL's loss, log-probabilities and gradient on the same inputs."""
  _run_reference(hf_dir, out, adapters, settings,
                 _plain({"prompts": prompts, "completions": completions, "advantages": advantages}))
  saved = dict(np.load(os.path.join(out, "trl_gradients.npz")))
  logps = [saved["logps"][i, :len(c)] for i, c in enumerate(completions)]
  return {"loss": float(saved["loss"]), "logps": logps,
          "grads": {k: v for k, v in saved.items() if "lora_" in k}}


def trl_train(hf_dir: str, out: str, adapters, steps: list[dict], settings: dict, train_cfg: TrainConfig) -> dict:
  """TRL's adapters after its optimizer steps on the same batches, and each step's loss."""
  opt = {"learning_rate": train_cfg.learning_rate, "b1": train_cfg.b1, "b2": train_cfg.b2, "eps": train_cfg.eps,
         "weight_decay": train_cfg.weight_decay, "max_grad_norm": train_cfg.max_grad_norm}
  _run_reference(hf_dir, out, adapters, settings, {"steps": [_plain(s) for s in steps], "optimizer": opt})
  saved = dict(np.load(os.path.join(out, "trl_trained.npz")))
  return {"adapters": {k: v for k, v in saved.items() if "lora_" in k}, "losses": saved["losses"].tolist()}


def relative_errors(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> tuple[float, dict]:
  """max |ours - theirs| / max |theirs| over all PEFT parameters, and per kind of weight (e.g. q_proj.lora_B)."""
  errors = {}
  for name, t in theirs.items():
    kind = name.split(".")[-4] + "." + name.split(".")[-3]
    diff, scale = errors.get(kind, (0.0, 0.0))
    errors[kind] = (max(diff, float(np.max(np.abs(ours[name] - t)))), max(scale, float(np.max(np.abs(t)))))
  overall = max(d for d, _ in errors.values()) / max(s for _, s in errors.values())
  return overall, {k: d / max(s, 1e-30) for k, (d, s) in sorted(errors.items())}


def compare(ours: dict, theirs: dict) -> dict:
  """The loss of both, the largest |difference| of the completion tokens' log-probabilities, and the
  gradient's relative error over all adapters and per kind of weight (`relative_errors`)."""
  overall, by_weight = relative_errors(ours["grads"], theirs["grads"])
  return {"loss": (ours["loss"], theirs["loss"]),
          "logp_max_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(ours["logps"], theirs["logps"])),
          "grad_relative_error": overall, "by_weight": by_weight}


def compare_training(ours: dict, theirs: dict, start: dict) -> dict:
  """Each step's loss of both, and how far apart the adapters' changes from `start` (PEFT's parameters before
  the first step) are: |ours - theirs| / |theirs| in the Euclidean norm, over all adapters and per kind of
  weight. (Not the largest element's error: Adam divides each gradient by its own scale, so an element whose
  gradient is at rounding level moves by a rounding-sized amount that may differ in sign.)"""
  diff, size = {}, {}
  for name, value in start.items():
    kind = name.split(".")[-4] + "." + name.split(".")[-3]
    mine, trls = ours["adapters"][name] - value, theirs["adapters"][name] - value
    diff[kind] = diff.get(kind, 0.0) + float(np.sum((mine - trls) ** 2))
    size[kind] = size.get(kind, 0.0) + float(np.sum(trls ** 2))
  return {"losses": list(zip(ours["losses"], theirs["losses"])),
          "change_relative_error": (sum(diff.values()) / sum(size.values())) ** 0.5,
          "change_by_weight": {k: (diff[k] / max(size[k], 1e-30)) ** 0.5 for k in sorted(diff)},
          "change_norm": sum(size.values()) ** 0.5}


_IMPORT = flags.DEFINE_string("import_dir", "ckpt/smollm2", "The model, as scripts/convert_hf.py import wrote it.")
_OUT = flags.DEFINE_string("out", "runs/grpo_trl_gradients", "Where the export and both sides' files go.")
_PROMPTS = flags.DEFINE_integer("prompts", 4, "Prompts of the task.")
_GENERATIONS = flags.DEFINE_integer("generations", 4, "Completions per prompt.")
_TOKENS = flags.DEFINE_integer("tokens", 64, "Tokens per completion at most.")
_SEED = flags.DEFINE_integer("seed", 0, "Adapters, advantages and sampling.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 0, "0: one step's gradient. N: N optimizer steps of both sides from the "
                              "adapters a run starts with (B = 0), on a batch of completions each (of the steps' "
                              "prompts, sampled from the base), and the adapters they end with. With "
                              "--replay: its first N steps (0: all).", lower_bound=0)
_REPLAY = flags.DEFINE_string("replay", "", "A TRL run's directory (scripts/trl_grpo.py's out: trl_init.npz, "
                              "trl_rollouts.npz, trl_adapters.npz; scripts/benchmark_grpo_trl.py's --workdir): "
                              "replay its rollouts through the project's update.")
_LOOP = flags.DEFINE_integer("loop", 0, "N: N steps of the project's GRPO loop, its rollouts checked against the "
                             "policy that sampled them and its update against project_train's.", lower_bound=0)
_SAMPLING = flags.DEFINE_string("sampling", "", "A TRL run's directory: the log-probabilities of each step's sampled "
                                "tokens under the policy that sampled them, against minus the entropy.")


def sampled_steps(config, task, base, count: int) -> list[dict]:
  """`count` batches of --prompts x --generations completions of the task's train prompts, a batch per step,
  sampled by the project from `base` at the task's temperature, with random advantages."""
  cfg, g, rng = config.model, config.grpo, np.random.default_rng(_SEED.value)
  steps = []
  for step in range(count):
    ids, lengths, _ = task.prompts("train", range(step * _PROMPTS.value, (step + 1) * _PROMPTS.value))
    ids, lengths = np.repeat(ids, _GENERATIONS.value, 0), np.repeat(lengths, _GENERATIONS.value)
    new = sampling.generate(lora.fold(base, cfg), ids, jax.random.fold_in(jax.random.key(_SEED.value), step),
                            model=Decoder(dataclasses.replace(cfg, lora_rank=0)), max_new_tokens=_TOKENS.value,
                            sampling=sampling.SamplingConfig(temperature=g.temperature), stop_ids=task.stop_ids,
                            prompt_lengths_B=lengths)
    completions, _ = grpo.completions_of(np.asarray(new), task.stop_ids)
    steps.append({"prompts": [row[len(row) - n:].tolist() for row, n in zip(ids, lengths)],
                  "completions": completions,
                  "advantages": rng.standard_normal(len(completions)).astype(np.float32)})
  return steps


def by_step(path: str) -> list[dict[str, np.ndarray]]:
  """An .npz of scripts/trl_grpo.py keyed step{i}/{name} (`_by_step`): each step's arrays by name, in order."""
  steps = {}
  with np.load(path) as saved:
    for key in saved.files:
      step, _, name = key.partition("/")
      steps.setdefault(int(step[len("step"):]), {})[name] = saved[key]
  return [steps[i] for i in range(len(steps))]


def trl_rollouts(path: str) -> list[dict]:
  """The batches a TRL run trained on (scripts/trl_grpo.py's trl_rollouts.npz), one per step, unpadded."""
  return [{"prompts": [p[m.astype(bool)].tolist() for p, m in zip(saved["prompt_ids"], saved["prompt_mask"])],
           "completions": [c[m.astype(bool)].tolist()
                           for c, m in zip(saved["completion_ids"], saved["completion_mask"])],
           "advantages": saved["advantages"].astype(np.float32)} for saved in by_step(path)]


def greedy_eval(config, task, base, adapters) -> dict:
  """The project's greedy eval (as `grpo.Sampler.evaluate`) of these adapters on the task's held-out prompts."""
  cfg, g = config.model, config.grpo
  ids, lengths, answers = task.prompts("eval", range(g.eval_prompts))
  new = sampling.generate(lora.fold(lora.merge(base, adapters), cfg), ids, jax.random.key(0),
                          model=Decoder(dataclasses.replace(cfg, lora_rank=0)),
                          max_new_tokens=g.max_completion_tokens, sampling=sampling.SamplingConfig(),
                          stop_ids=task.stop_ids, prompt_lengths_B=lengths)
  _, texts, shape = grpo.complete(np.asarray(new), task.tokenizer, task.stop_ids)
  rewards = task.score(texts, list(answers))
  return {"reward": float(np.mean(sum(rewards.values()))), "completion_length": float(np.mean(shape["lengths"])),
          "finished": float(np.mean(shape["finished"]))}


@functools.cache
def _token_entropies(cfg: ModelConfig, temperature: float):
  """(log p of each position's next token, the entropy of the position's distribution, the variance of log p
  under it) [B, L], of the logits / temperature."""
  model = Decoder(cfg)

  def run(params, batch):
    x = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"],
                    method=Decoder.hidden)
    logp = jax.nn.log_softmax(output_logits(x, output_weight(params, cfg), cfg) / temperature, axis=-1)
    p = jnp.exp(logp)
    entropy = -jnp.sum(p * logp, axis=-1)
    drawn = jnp.take_along_axis(logp, batching.targets(batch["tokens"])[..., None], axis=-1)[..., 0]
    return drawn, entropy, jnp.sum(p * logp ** 2, axis=-1) - entropy ** 2
  return jax.jit(run)


def sampling_bias(cfg: ModelConfig, params, step: dict, temperature: float, rows: int = 8) -> dict:
  """The mean over a step's completion tokens of log p(token) + H under `params` at `temperature` (0 in
  expectation for tokens drawn from that distribution), its standard error and the token count."""
  prompts, completions = step["prompts"], step["completions"]
  padded, lengths = left_padded(prompts)
  batch = grpo.assemble(padded, lengths, completions, int(max(map(len, prompts)) + max(map(len, completions))))
  total, variance, count = 0.0, 0.0, 0
  for start in range(0, len(completions), rows):
    part = {k: v[start:start + rows] for k, v in batch.items()}
    drawn, entropy, var = (np.asarray(x, np.float64) for x in _token_entropies(cfg, temperature)(params, part))
    mask = part["mask"]
    total, variance, count = total + np.sum((drawn + entropy)[mask]), variance + np.sum(var[mask]), count + mask.sum()
  return {"bias": total / count, "standard_error": variance ** 0.5 / count, "tokens": int(count)}


def sampling_check(config, base, run: str) -> None:
  """`sampling_bias` of each step of a TRL run (`--sampling`), under the adapters that sampled it, at the run's
  temperature (its spec.json)."""
  with open(os.path.join(run, "spec.json")) as f:
    temperature = json.load(f)["settings"]["temperature"]
  like = random_adapters(config.model, 0, b_std=0.0)
  policies = by_step(os.path.join(run, "trl_policies.npz"))
  for i, (step, policy) in enumerate(zip(trl_rollouts(os.path.join(run, "trl_rollouts.npz")), policies)):
    adapters = from_peft(policy, like)
    figures = sampling_bias(config.model, lora.merge(base, adapters), step, temperature)
    print(f"step {i}: log p + H = {figures['bias']:+.4f} +- {figures['standard_error']:.4f} over {figures['tokens']} "
          "sampled tokens", flush=True)


def recorded_loop(config, workdir: str) -> list[dict]:
  """Each step of the project's GRPO loop (`train.train_and_evaluate` of `config`, in a fresh `workdir`): its
  rollout as it was trained on ({"prompts", "completions", "advantages"}) and the adapters that sampled it."""
  import shutil
  from lm.training import train
  shutil.rmtree(workdir, ignore_errors=True)  # a run from the start, not a resumed one
  recorded, batch = [], grpo.GRPO.batch

  def recording(kind, step, state):
    adapters = jax.tree.map(np.asarray, state.params)
    out = batch(kind, step, state)
    rows = kind._rollout.batch
    starts = [int(np.flatnonzero(m)[0]) + 1 for m in rows["mask"]]  # each completion's first position
    tokens, counts = rows["tokens"], rows["mask"].sum(1)
    recorded.append({"adapters": adapters, "advantages": rows["advantages"],
                     "prompts": [t[:p].tolist() for t, p in zip(tokens, starts)],
                     "completions": [t[p:p + n].tolist() for t, p, n in zip(tokens, starts, counts)]})
    return out
  grpo.GRPO.batch = recording
  try:
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  finally:
    grpo.GRPO.batch = batch
  return recorded


def loop_check(base, settings: dict, workdir: str) -> None:
  """`--loop`: N + 1 steps of the project's loop recorded (the last one's adapters are those after N updates);
  each rollout's `sampling_bias` under the adapters that sampled it; the loop's adapters after N steps against
  `project_train`'s on the loop's first N rollouts."""
  from configs import imported_grpo
  from lm.config import from_config_dict
  steps, c = _LOOP.value, imported_grpo.get_config(_IMPORT.value)
  c.grpo.num_generations, c.grpo.max_completion_tokens, c.grpo.eval_prompts = _GENERATIONS.value, _TOKENS.value, 4
  c.train.micro_batch_size, c.train.gradient_accumulation_steps = _PROMPTS.value * _GENERATIONS.value, 1
  c.train.seq_len, c.train.seed, c.train.num_train_steps = 64 + _TOKENS.value, _SEED.value, steps + 1
  c.train.save_interval_steps = c.train.eval_interval_steps = steps + 1
  c.mesh.data, c.mesh.fsdp = 1, 1
  config = from_config_dict(c)
  recorded = recorded_loop(config, workdir)
  for i, step in enumerate(recorded[:steps]):
    figures = sampling_bias(config.model, lora.merge(base, step["adapters"]), step, config.grpo.temperature)
    print(f"loop step {i}: log p + H = {figures['bias']:+.4f} +- {figures['standard_error']:.4f} over "
          f"{figures['tokens']} sampled tokens", flush=True)
  ours = project_train(config.model, base, recorded[0]["adapters"], recorded[:steps], settings, config.train)
  result = compare_training(ours, {"adapters": to_peft(recorded[steps]["adapters"]), "losses": ours["losses"]},
                            to_peft(recorded[0]["adapters"]))
  print(f"the loop's adapters after {steps} steps against project_train's on the loop's rollouts: relative error "
        f"{result['change_relative_error']:.2e} of a change of norm {result['change_norm']:.3f}")


def replay(config, tokenizer, base, settings: dict, run: str) -> None:
  """TRL's rollouts of a run (scripts/trl_grpo.py's files in `run`) through the project's update from TRL's
  starting adapters: each step's loss, how far the adapters end from TRL's, and both greedy evals. The
  run's settings (its spec.json, as scripts/benchmark_grpo_trl.py wrote it) replace the config's."""
  with open(os.path.join(run, "spec.json")) as f:
    spec = json.load(f)
  s = spec["settings"]
  settings = {**settings, **{k: s[k] for k in ("beta", "epsilon", "temperature", "kl_bias_correction") if k in s}}
  config = dataclasses.replace(
      config, train=dataclasses.replace(config.train, seed=s["seed"], learning_rate=s["learning_rate"], b1=s["b1"],
                                        b2=s["b2"], max_grad_norm=s["max_grad_norm"], weight_decay=0.0),
      grpo=dataclasses.replace(config.grpo, max_completion_tokens=s["completion_tokens"],
                               eval_prompts=len(spec["eval"])))
  task = grpo.make_task(config, tokenizer)
  like = random_adapters(config.model, 0, b_std=0.0)
  start = dict(np.load(os.path.join(run, "trl_init.npz")))
  steps = trl_rollouts(os.path.join(run, "trl_rollouts.npz"))[:_TRAIN_STEPS.value or None]
  ours = project_train(config.model, base, from_peft(start, like), steps, settings, config.train)
  theirs = {"adapters": dict(np.load(os.path.join(run, "trl_adapters.npz"))), "losses": [float("nan")] * len(steps)}
  result = compare_training(ours, theirs, start)
  print(json.dumps({"losses": [round(x, 6) for x in ours["losses"]],
                    **{k: v for k, v in result.items() if k != "losses"}}, indent=1))
  print("the project's update on TRL's rollouts, greedy eval:", greedy_eval(config, task, base, from_peft(
      ours["adapters"], like)))
  print("TRL's adapters, the same eval:", greedy_eval(config, task, base, from_peft(theirs["adapters"], like)))


def main(argv):
  del argv
  from configs import imported_grpo
  from lm.checkpoints import param_files
  from lm.config import from_config_dict
  from lm.data import corpus
  config = from_config_dict(imported_grpo.get_config(_IMPORT.value))
  cfg, g = config.model, config.grpo
  settings = {"beta": g.beta, "epsilon": g.epsilon, "temperature": g.temperature, "lora_rank": cfg.lora_rank,
              "lora_alpha": cfg.lora_alpha, "kl_bias_correction": g.kl_bias_correction}
  base, _ = param_files.load_params_on_host(_IMPORT.value)
  tokenizer = corpus.load_tokenizer(config.data, cfg.vocab_size)
  if _REPLAY.value:
    replay(config, tokenizer, base, settings, _REPLAY.value)
    return
  if _SAMPLING.value:
    sampling_check(config, base, _SAMPLING.value)
    return
  if _LOOP.value:
    loop_check(base, settings, os.path.join(os.path.abspath(_OUT.value), "loop"))
    return
  task = grpo.make_task(config, tokenizer)
  out = os.path.abspath(_OUT.value)
  hf_dir = os.path.join(out, "hf")
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts/convert_hf.py"), "export",
                    f"--checkpoint={_IMPORT.value}", f"--out={hf_dir}"], check=True, cwd=ROOT)
  if _TRAIN_STEPS.value:
    adapters = random_adapters(cfg, _SEED.value, b_std=0.0)  # as a run starts: B = 0
    steps = sampled_steps(config, task, base, _TRAIN_STEPS.value)
    ours = project_train(cfg, base, adapters, steps, settings, config.train)
    theirs = trl_train(hf_dir, out, adapters, steps, settings, config.train)
    print(f"{_TRAIN_STEPS.value} optimizer steps of {len(steps[0]['completions'])} completions, learning rate "
          f"{config.train.learning_rate:g}")
    print(json.dumps(compare_training(ours, theirs, to_peft(adapters)), indent=1))
    return
  adapters = random_adapters(cfg, _SEED.value, b_std=0.01)
  step = sampled_steps(config, task, lora.fold(lora.merge(base, adapters), cfg), 1)[0]
  ours = project_step(cfg, base, adapters, step["prompts"], step["completions"], step["advantages"], settings)
  theirs = trl_step(hf_dir, out, adapters, step["prompts"], step["completions"], step["advantages"], settings)
  result = compare(ours, theirs)
  ended = sum(c[-1] in task.stop_ids for c in step["completions"])
  print(f"{len(step['completions'])} completions ({ended} ended by themselves, "
        f"{sum(map(len, step['completions']))} tokens)")
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
