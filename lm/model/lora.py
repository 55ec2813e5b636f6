"""LoRA: low-rank adapters beside the frozen weights of chosen projections (Hu et al., 2021).

A projection `y = x W` with an adapter computes `y = x W + (alpha / rank) (x A) B`: A maps W's input axes to
`rank`, B maps `rank` to W's output axes. A starts random and B at zero, so the adapted model starts as the
base model exactly. The adapters live in the parameter tree beside the weight they adapt, named
`<weight>_lora_a` and `<weight>_lora_b` (`q_proj_lora_a`, ...), with a leading layer axis when the layers
are scanned.

Training keeps the two apart (`split`): the optimizer, its state, the accumulated gradients and the
checkpoints hold the adapters alone; the base weights are a frozen input of the step (`merge` puts the
tree back together for the model). `fold` writes the adapters into the weights (W + alpha/rank A B) for an
export.

Why not a library such as qwix: its LoRA intercepts the einsum of a raw parameter, while this model casts
each weight to the compute dtype first and runs its layers under `nn.scan`, `nn.remat` and `shard_map`;
the adapter itself is the few lines of `project` below.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from lm.config import ModelConfig

# Which projections can carry adapters (config.model.lora_targets names them): weight name by target.
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}
SUFFIXES = ("_lora_a", "_lora_b")


def targets(cfg: ModelConfig) -> frozenset[str]:
  """The weight names that get adapters (none when lora_rank is 0)."""
  if not cfg.lora_rank:
    return frozenset()
  return frozenset(TARGETS[t.strip()] for t in cfg.lora_targets.split(",") if t.strip())


def project(module: nn.Module, cfg: ModelConfig, spec: str, x, w, name: str, names: tuple, inputs: int):
  """einsum(spec, x, w) in the compute dtype, plus the adapter of `name` when it has one.

  Args:
    spec: the einsum of x with the weight, e.g. "BLD,DNH->BLNH"; the weight's first `inputs` axes are the
      ones x is contracted with.
    w: the weight (its parameter); names: its logical axis names (the adapters' shard like them).
  """
  dtype = jnp.dtype(cfg.dtype)
  y = jnp.einsum(spec, x, w.astype(dtype))
  if name not in targets(cfg):
    return y
  operands, out = spec.split("->")
  x_axes, w_axes = operands.split(",")
  r = cfg.lora_rank
  param_dtype = jnp.dtype(cfg.param_dtype)
  fan_in = math.prod(w.shape[:inputs])  # A ~ N(0, 1/fan_in): x A keeps x's scale; B = 0 keeps the base
  a = module.param(f"{name}_lora_a", nn.with_logical_partitioning(nn.initializers.normal(fan_in ** -0.5),
                                                                  (*names[:inputs], None)),
                   (*w.shape[:inputs], r), param_dtype)
  b = module.param(f"{name}_lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None, *names[inputs:])),
                   (r, *w.shape[inputs:]), param_dtype)
  low_axes = "".join(c for c in x_axes if c not in w_axes[:inputs]) + "r"
  low = jnp.einsum(f"{x_axes},{w_axes[:inputs]}r->{low_axes}", x, a.astype(dtype))
  delta = jnp.einsum(f"{low_axes},r{w_axes[inputs:]}->{out}", low, b.astype(dtype))
  return y + delta * jnp.asarray(cfg.lora_alpha / r, dtype)


def is_adapter(path: tuple[str, ...]) -> bool:
  return str(path[-1]).endswith(SUFFIXES)


def split(params) -> tuple[dict, dict]:
  """(base, adapters): two nested dicts of the parameter tree (boxed or not), by leaf name."""
  flat = traverse_util.flatten_dict(params)
  base = {k: v for k, v in flat.items() if not is_adapter(k)}
  adapters = {k: v for k, v in flat.items() if is_adapter(k)}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def merge(base, adapters):
  """The whole tree the model takes; `base` None means `adapters` is already whole (no LoRA)."""
  if base is None:
    return adapters
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(adapters)})


def no_change(adapters) -> jax.Array:
  """Whether the adapters change nothing: every adapted weight's B (or its A) is all zeros, as at
  initialisation (B = 0). The adapted model then computes exactly the base model's function (x A B adds 0)."""
  flat = traverse_util.flatten_dict(adapters)
  pairs = [(v, flat[k[:-1] + (k[-1][:-len("_lora_a")] + "_lora_b",)]) for k, v in flat.items()
           if str(k[-1]).endswith("_lora_a")]
  return jnp.all(jnp.stack([jnp.all(a == 0) | jnp.all(b == 0) for a, b in pairs]))


def fold(params, cfg: ModelConfig):
  """The parameters without adapters, each adapted weight replaced by W + alpha/rank A B (in float32, then
  the weight's dtype): the same function as the adapted model, up to rounding."""
  flat = traverse_util.flatten_dict(params)
  out = {k: v for k, v in flat.items() if not is_adapter(k)}
  for key, w in out.items():
    a, b = flat.get(key[:-1] + (key[-1] + "_lora_a",)), flat.get(key[:-1] + (key[-1] + "_lora_b",))
    if a is None:
      continue
    lead = a.ndim + b.ndim - 2 - w.ndim  # the layer axis of scanned layers
    fan_in = a.shape[lead:-1]
    a2 = jnp.reshape(jnp.asarray(a, jnp.float32), (*a.shape[:lead], -1, a.shape[-1]))
    b2 = jnp.reshape(jnp.asarray(b, jnp.float32), (*b.shape[:lead + 1], -1))
    delta = jnp.reshape(jnp.matmul(a2, b2), (*a.shape[:lead], *fan_in, *b.shape[lead + 1:]))
    out[key] = (jnp.asarray(w, jnp.float32) + delta * (cfg.lora_alpha / cfg.lora_rank)).astype(w.dtype)
  return traverse_util.unflatten_dict(out)


def count(params) -> int:
  """Number of adapter values in a parameter tree."""
  return sum(x.size for x in jax.tree.leaves(split(params)[1]))
