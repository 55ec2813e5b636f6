"""One GRPO step's loss and LoRA gradient, the project's against TRL's GRPOTrainer, on the same completions.

  python scripts/grpo_trl_gradients.py [--import_dir=ckpt/smollm2] [--prompts=4 --generations=4 --tokens=64]

The import's model (scripts/convert_hf.py import) is exported to a Hugging Face directory; both sides get the
same adapters (A random as the project initialises it, B random too, so that the policy is off the reference
and the KL term has a gradient), the same prompts of configs/imported_grpo.py's task in the chat template,
the same completions (sampled by the project at the task's temperature, some ending with the end of the turn,
some truncated) and the same advantages. TRL's side is tests/trl_reference.py under .venv-hf: its own
`compute_loss` on inputs laid out as its `_generate_and_score_completions` lays them out. Prints the loss of
both, the largest difference of the per-token log-probabilities, and the relative error of each adapter's
gradient (max |ours - theirs| / max |theirs|): whether an optimizer step of the two would be the same.
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
from absl import app, flags  # noqa: E402
from flax import linen as nn  # noqa: E402

from lm.config import ModelConfig  # noqa: E402
from lm.model import lora  # noqa: E402
from lm.model.decoder import Decoder  # noqa: E402
from lm.training import grpo, train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_PYTHON = os.path.join(ROOT, ".venv-hf", "bin", "python")
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}


def peft_name(module: str, weight: str, layer: int, half: str) -> str:
  return f"base_model.model.model.layers.{layer}.{_HF_MODULE[module]}.{weight}.lora_{half}.default.weight"


def to_peft(adapters: dict) -> dict[str, np.ndarray]:
  """The project's adapters (scanned layers: [layers, *in, rank] and [layers, rank, *out]) as PEFT's
  parameters: lora_A [rank, in], lora_B [out, rank] per layer."""
  out = {}
  for module, weights in adapters["layers"].items():
    for name, value in weights.items():
      weight, half = name[:-len("_lora_a")], name[-1].upper()
      value = np.asarray(value, np.float32)
      for layer, w in enumerate(value):
        rank = w.shape[-1] if half == "A" else w.shape[0]
        matrix = w.reshape(-1, rank).T if half == "A" else w.reshape(rank, -1).T
        out[peft_name(module, weight, layer, half)] = np.ascontiguousarray(matrix)
  return out


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


def project_step(cfg: ModelConfig, base, adapters, prompts: list[list[int]], completions: list[list[int]],
                 advantages, settings: dict) -> dict:
  """The project's loss, per-token log-probabilities and adapter gradient of one GRPO step on these
  completions (one micro-batch): `grpo.assemble`, the reference's log-probabilities (the base), and
  `train_step.gradient` of `grpo.policy_losses` scaled by the step's completion tokens, as train_step runs it,
  the logits of the completions' positions alone (`logit_positions`), as a rollout computes them."""
  lengths = np.asarray([len(p) for p in prompts])
  width = int(lengths.max())
  padded = np.zeros((len(prompts), width), np.int32)
  for row, p in zip(padded, prompts):
    row[width - len(p):] = p
  seq_len = int(max(len(p) + len(c) for p, c in zip(prompts, completions)))
  window = max(len(c) for c in completions)  # logits of the completions' positions alone, as in a rollout
  batch = grpo.assemble(padded, lengths, completions, seq_len, window=window)
  model = Decoder(cfg)
  logprobs = jax.jit(functools.partial(train_step.token_logprobs, model, temperature=settings["temperature"]))
  zeros = jax.tree.map(jnp.zeros_like, adapters)
  batch["ref_logprobs"] = np.asarray(logprobs(lora.merge(base, zeros), batch))
  batch["advantages"] = np.asarray(advantages, np.float32)
  losses = functools.partial(grpo.policy_losses, beta=settings["beta"], epsilon=settings["epsilon"],
                             temperature=settings["temperature"],
                             kl_bias_correction=settings.get("kl_bias_correction", True))
  scale = train_step.loss_scale(batch)
  grads, figures = jax.jit(lambda a, b: train_step.gradient(model, a, base, b, scale, losses))(adapters, batch)
  logps = np.asarray(logprobs(lora.merge(base, adapters), batch))
  loss = float(np.sum(np.asarray(figures["sequence_loss"], np.float64)) * float(scale))
  starts = lengths - 1 - batch["logit_positions"][:, 0]  # where each completion starts in its window
  rows = [logps[i, s:s + len(c)] for i, (s, c) in enumerate(zip(starts, completions))]
  return {"loss": loss, "logps": rows, "grads": to_peft(grads)}


def trl_step(hf_dir: str, out: str, adapters, prompts, completions, advantages, settings: dict) -> dict:
  """tests/trl_reference.py under .venv-hf on the same inputs: TRL's loss, log-probabilities, gradient."""
  os.makedirs(out, exist_ok=True)
  np.savez(os.path.join(out, "adapters.npz"), **to_peft(adapters))
  spec = {"model": hf_dir, "out": out, "prompts": prompts, "completions": completions,
          "advantages": [float(a) for a in advantages], "adapters": os.path.join(out, "adapters.npz"),
          "settings": settings}
  with open(os.path.join(out, "spec.json"), "w") as f:
    json.dump(spec, f)
  run = subprocess.run([HF_PYTHON, os.path.join(ROOT, "tests", "trl_reference.py"), os.path.join(out, "spec.json")],
                       capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  if run.returncode:
    raise RuntimeError(f"tests/trl_reference.py failed:\n{run.stderr[-4000:]}")
  saved = dict(np.load(os.path.join(out, "trl_gradients.npz")))
  logps = [saved["logps"][i, :len(c)] for i, c in enumerate(completions)]
  return {"loss": float(saved["loss"]), "logps": logps,
          "grads": {k: v for k, v in saved.items() if "lora_" in k}}


def compare(ours: dict, theirs: dict) -> dict:
  """The loss of both, the largest |difference| of the completion tokens' log-probabilities, and the
  gradient's relative error (max |ours - theirs| / max |theirs|) over all adapters and per kind of weight."""
  errors = {}
  for name, g in theirs["grads"].items():
    kind = name.split(".")[-4] + "." + name.split(".")[-3]  # e.g. q_proj.lora_B
    diff, scale = errors.get(kind, (0.0, 0.0))
    errors[kind] = (max(diff, float(np.max(np.abs(ours["grads"][name] - g)))), max(scale, float(np.max(np.abs(g)))))
  overall = max(d for d, _ in errors.values()) / max(s for _, s in errors.values())
  return {"loss": (ours["loss"], theirs["loss"]),
          "logp_max_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(ours["logps"], theirs["logps"])),
          "grad_relative_error": overall, "by_weight": {k: d / max(s, 1e-30) for k, (d, s) in sorted(errors.items())}}


_IMPORT = flags.DEFINE_string("import_dir", "ckpt/smollm2", "The model, as scripts/convert_hf.py import wrote it.")
_OUT = flags.DEFINE_string("out", "runs/grpo_trl_gradients", "Where the export and both sides' files go.")
_PROMPTS = flags.DEFINE_integer("prompts", 4, "Prompts of the task.")
_GENERATIONS = flags.DEFINE_integer("generations", 4, "Completions per prompt.")
_TOKENS = flags.DEFINE_integer("tokens", 64, "Tokens per completion at most.")
_SEED = flags.DEFINE_integer("seed", 0, "Adapters, advantages and sampling.")


def main(argv):
  del argv
  from configs import imported_grpo
  from lm.checkpoints import param_files
  from lm.config import from_config_dict
  from lm.data import corpus
  from lm.model import sampling
  config = from_config_dict(imported_grpo.get_config(_IMPORT.value))
  cfg, g = config.model, config.grpo
  settings = {"beta": g.beta, "epsilon": g.epsilon, "temperature": g.temperature, "lora_rank": cfg.lora_rank,
              "lora_alpha": cfg.lora_alpha, "kl_bias_correction": g.kl_bias_correction}
  base, _ = param_files.load_params_on_host(_IMPORT.value)
  adapters = random_adapters(cfg, _SEED.value, b_std=0.01)
  task = grpo.make_task(config, corpus.load_tokenizer(config.data, cfg.vocab_size))
  ids, lengths, _ = task.prompts("train", range(_PROMPTS.value))
  ids, lengths = np.repeat(ids, _GENERATIONS.value, 0), np.repeat(lengths, _GENERATIONS.value)
  new = sampling.generate(lora.fold(lora.merge(base, adapters), cfg), ids, jax.random.key(_SEED.value),
                          model=Decoder(dataclasses.replace(cfg, lora_rank=0)), max_new_tokens=_TOKENS.value,
                          sampling=sampling.SamplingConfig(temperature=g.temperature), stop_ids=task.stop_ids,
                          prompt_lengths_B=lengths)
  completions, _ = grpo.completions_of(np.asarray(new), task.stop_ids)
  prompts = [row[len(row) - n:].tolist() for row, n in zip(ids, lengths)]
  advantages = np.random.default_rng(_SEED.value).standard_normal(len(prompts)).astype(np.float32)
  out = os.path.abspath(_OUT.value)
  hf_dir = os.path.join(out, "hf")
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts/convert_hf.py"), "export",
                    f"--checkpoint={_IMPORT.value}", f"--out={hf_dir}"], check=True, cwd=ROOT)
  ours = project_step(cfg, base, adapters, prompts, completions, advantages, settings)
  theirs = trl_step(hf_dir, out, adapters, prompts, completions, advantages, settings)
  result = compare(ours, theirs)
  ended = sum(c[-1] in task.stop_ids for c in completions)
  print(f"{len(completions)} completions ({ended} ended by themselves, {sum(map(len, completions))} tokens)")
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
