"""Hugging Face checkpoints (config.json + safetensors) <-> this project's model config and parameters.

Families: LLaMA (`LlamaForCausalLM`), Qwen3 (`Qwen3ForCausalLM`) and Gemma3 (`Gemma3ForCausalLM`, and the
language model of `Gemma3ForConditionalGeneration`). The layouts differ in:
  - projections: Hugging Face stores each as a 2-D `out x in` matrix (q_proj: N*H x D); this project keeps
    the heads as an axis and the input first (q_proj: D x N x H, o_proj: N x H x D, gate_proj: D x F);
  - RoPE: both rotate the two halves of each head (`rotate_half`); Hugging Face's LLaMA checkpoints were
    permuted from Meta's interleaved layout into exactly this one, so q and k need no permutation;
  - layers: scanned models stack each parameter along a leading layer axis, Hugging Face names each layer;
  - tied heads: a tied model has no `lm_head.weight` here; some checkpoints store one anyway (a copy);
  - norms: LLaMA's `post_attention_layernorm` is the norm before the MLP, Gemma's is the norm after attention.
Tensors are numpy arrays, files are read and written with safetensors: no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping

import numpy as np

from lm.config import ModelConfig, validate_model
from lm.errors import ConfigError
from lm.model.decoder import layer_pattern


# family (model.name) -> the architecture written on export
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
MODEL_TYPES = {"llama": "llama", "qwen3": "qwen3", "gemma3": "gemma3_text"}
# Read too: the text model inside Gemma3's image-text checkpoint (its vision tower is left out).
IMPORT_ARCHITECTURES = {**{a: f for f, a in ARCHITECTURES.items()}, "Gemma3ForConditionalGeneration": "gemma3"}
# Tensor name prefixes of Gemma3ForConditionalGeneration's language model, as older and newer
# transformers releases save them, and the parts that are not the language model.
MULTIMODAL_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                       ("language_model.lm_head.", "lm_head."))
MULTIMODAL_SKIPPED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                      "model.multi_modal_projector.")
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
MAX_SHARD_BYTES = 5 * 2**30  # the size at which save_pretrained starts a new file by default


class HFError(ValueError):
  """A Hugging Face checkpoint this project cannot read or write; the message names what and why."""


# ---------------------------------------------------------------------------------------------------------
# config.json


def _rope(hf: dict, layer_type: str, legacy_theta_key: str, default_theta: float,
          scaled: bool) -> tuple[float, float]:
  """(theta, linear scaling factor) of one layer type, from `rope_parameters` (transformers 5: one dict,
  or one per layer type) or the older `rope_theta` / `rope_local_base_freq` / `rope_scaling` keys, with
  transformers' defaults for absent ones."""
  params = hf.get("rope_parameters") or {}
  if isinstance(params.get(layer_type), dict):
    params = params[layer_type]
  if "rope_theta" not in params:  # written before transformers 5
    params = {**((hf.get("rope_scaling") or {}) if scaled else {}),
              "rope_theta": hf.get(legacy_theta_key, default_theta)}
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return float(params["rope_theta"]), 1.0
  if kind == "linear":
    return float(params["rope_theta"]), float(params["factor"])
  raise HFError(f"config.json: RoPE type {kind!r} ({layer_type} layers) is not supported; this project "
                "implements the default and linear RoPE only.")


def _require(hf: dict, key: str, allowed, default=None) -> None:
  value = hf.get(key, default)
  if value not in allowed:
    raise HFError(f"config.json: {key} = {value!r} is not supported (this project implements {allowed}).")


def read_config(hf_dir: str) -> tuple[str, dict]:
  """(family, the language model's config.json dict) of a Hugging Face checkpoint directory."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise HFError(f"{hf_dir} has no config.json: not a Hugging Face checkpoint directory.")
  with open(path) as f:
    hf = json.load(f)
  architectures = hf.get("architectures") or []
  known = [a for a in architectures if a in IMPORT_ARCHITECTURES]
  if not known:
    raise HFError(f"{path}: architectures = {architectures} (model_type {hf.get('model_type')!r}) is not "
                  f"supported; this converter reads {', '.join(IMPORT_ARCHITECTURES)}.")
  if known[0] == "Gemma3ForConditionalGeneration":
    hf = hf["text_config"]
  return IMPORT_ARCHITECTURES[known[0]], hf


def model_config_from_hf(family: str, hf: dict, defaults: ModelConfig) -> ModelConfig:
  """The model of a Hugging Face config.json; run settings (dtype, remat, ...) come from `defaults`."""
  D, N = hf["hidden_size"], hf["num_attention_heads"]
  fields = dict(
      name=family, vocab_size=hf["vocab_size"], d_model=D, num_layers=hf["num_hidden_layers"], num_heads=N,
      num_kv_heads=hf.get("num_key_value_heads") or N, head_dim=hf.get("head_dim") or D // N,
      mlp_dim=hf["intermediate_size"], norm_eps=float(hf["rms_norm_eps"]),
      tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma3")),
      max_seq_len=hf.get("max_position_embeddings", defaults.max_seq_len),
      sliding_window=0, local_layers_per_global=0, rope_local_theta=defaults.rope_local_theta,
      query_scale_dim=0)
  _require(hf, "attention_bias", (False, None))
  _require(hf, "mlp_bias", (False, None))
  if family in ("llama", "qwen3"):
    _require(hf, "hidden_act", ("silu",), "silu")
    fields["rope_theta"], fields["rope_scaling_factor"] = _rope(hf, "full_attention", "rope_theta", 10_000.0,
                                                                True)
    fields.update(qk_norm=family == "qwen3", post_norms=False, norm_unit_offset=False, mlp_activation="silu",
                  embed_scale=False)
    if family == "qwen3":
      _require(hf, "use_sliding_window", (False, None))
    types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in types):
      raise HFError(f"config.json: layer_types {types} has sliding-window layers; for {family} this "
                    "project supports full attention in every layer.")
  else:
    _require(hf, "hidden_activation", ("gelu_pytorch_tanh",), hf.get("hidden_act", "gelu_pytorch_tanh"))
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
      _require(hf, key, (None,))
    _require(hf, "use_bidirectional_attention", (False, None))
    fields.update(qk_norm=True, post_norms=True, norm_unit_offset=True, mlp_activation="gelu_tanh",
                  embed_scale=True, query_scale_dim=int(hf.get("query_pre_attn_scalar", 256)))
    fields["rope_theta"], fields["rope_scaling_factor"] = _rope(hf, "full_attention", "rope_theta",
                                                                1_000_000.0, True)
    fields["rope_local_theta"], local_scaling = _rope(hf, "sliding_attention", "rope_local_base_freq",
                                                      10_000.0, False)
    if local_scaling != 1.0:
      raise HFError("config.json: RoPE scaling of the sliding-window layers is not supported.")
    types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
        for i in range(fields["num_layers"])]
    if "sliding_attention" in types:
      period = types.index("full_attention") + 1 if "full_attention" in types else len(types) + 1
      fields.update(sliding_window=int(hf["sliding_window"]), local_layers_per_global=period - 1)
  cfg = dataclasses.replace(defaults, **fields)
  if family == "gemma3":
    ours = ["sliding_attention" if local else "full_attention" for local in layer_pattern(cfg)]
    if ours != types:
      raise HFError(f"config.json: layer_types {types} is not a repeating pattern of local layers followed "
                    "by one global layer, the only pattern this project implements.")
  try:
    validate_model(cfg)
  except ConfigError as e:
    raise HFError(f"config.json describes a model this project cannot build: {e}") from e
  return cfg


def _exportable(cfg: ModelConfig) -> None:
  """Raises HFError when the family's Hugging Face architecture cannot express the model's switches."""
  gemma = cfg.name == "gemma3"
  needed = {"qk_norm": cfg.name != "llama", "post_norms": gemma, "norm_unit_offset": gemma,
            "mlp_activation": "gelu_tanh" if gemma else "silu", "embed_scale": gemma}
  wrong = [f"model.{k} = {getattr(cfg, k)!r} (it needs {v!r})" for k, v in needed.items() if getattr(cfg, k) != v]
  if not gemma:
    if cfg.query_scale_dim not in (0, cfg.head_dim):
      wrong.append(f"model.query_scale_dim = {cfg.query_scale_dim} (it scales by head_dim)")
    if cfg.sliding_window:
      wrong.append(f"model.sliding_window = {cfg.sliding_window} (it has no local layers)")
  if wrong:
    raise HFError(f"model.name = {cfg.name!r} exports to {ARCHITECTURES[cfg.name]}, which cannot express "
                  f"{'; '.join(wrong)}. Export with the model.name whose architecture has these switches.")


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
  """config.json for the model: the keys of transformers 5 (`rope_parameters`, `layer_types`, `dtype`) and
  the older ones that earlier releases read."""
  _exportable(cfg)
  global_rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling_factor != 1.0:
    global_rope.update(rope_type="linear", factor=cfg.rope_scaling_factor)
  legacy_scaling = None if cfg.rope_scaling_factor == 1.0 else {k: v for k, v in global_rope.items()
                                                                  if k != "rope_theta"}
  hf = dict(
      architectures=[ARCHITECTURES[cfg.name]], model_type=MODEL_TYPES[cfg.name], vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, rope_theta=cfg.rope_theta,
      rope_scaling=legacy_scaling, dtype=dtype, torch_dtype=dtype)
  if cfg.name == "gemma3":
    types = ["sliding_attention" if local else "full_attention" for local in layer_pattern(cfg)]
    hf.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=cfg.query_scale_dim or cfg.head_dim,
              sliding_window=cfg.sliding_window or 4096, layer_types=types,
              sliding_window_pattern=cfg.local_layers_per_global + 1 if cfg.sliding_window else 1,
              rope_local_base_freq=cfg.rope_local_theta, final_logit_softcapping=None,
              attn_logit_softcapping=None,
              rope_parameters={"full_attention": global_rope,
                               "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}})
  else:
    hf.update(hidden_act="silu", mlp_bias=False, rope_parameters=global_rope)
    if cfg.name == "qwen3":
      hf.update(use_sliding_window=False, layer_types=["full_attention"] * cfg.num_layers)
  return hf


# ---------------------------------------------------------------------------------------------------------
# tensors


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One Hugging Face tensor and where it lives in this project's parameter tree."""
  hf_name: str
  path: tuple[str, ...]  # key path in the params tree
  layer: int | None  # index along the stacked layer axis of scanned params; None otherwise
  split: int | None  # our kernel's input axes: it is `prod(shape[:split]) x rest`, transposed in HF


LAYER_TENSORS = {  # our path inside a block -> (HF name inside `model.layers.<i>.`, input axes)
    ("attn", "q_proj"): ("self_attn.q_proj.weight", 1),
    ("attn", "k_proj"): ("self_attn.k_proj.weight", 1),
    ("attn", "v_proj"): ("self_attn.v_proj.weight", 1),
    ("attn", "o_proj"): ("self_attn.o_proj.weight", 2),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", None),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", None),
    ("mlp", "gate_proj"): ("mlp.gate_proj.weight", 1),
    ("mlp", "up_proj"): ("mlp.up_proj.weight", 1),
    ("mlp", "down_proj"): ("mlp.down_proj.weight", 1),
    ("attn_norm", "scale"): ("input_layernorm.weight", None),
    ("attn_post_norm", "scale"): ("post_attention_layernorm.weight", None),
    ("mlp_post_norm", "scale"): ("post_feedforward_layernorm.weight", None),
}
TOP_TENSORS = {("embedding",): ("model.embed_tokens.weight", None), ("final_norm", "scale"): ("model.norm.weight", None),
               ("lm_head",): ("lm_head.weight", 1)}


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, prefix + (key,)).items()}
  return {prefix: tree}


def _unflatten(flat: dict[tuple[str, ...], object]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def tensor_map(cfg: ModelConfig, shapes: dict) -> list[Tensor]:
  """Every parameter of the tree `shapes` (its leaves need `.shape`), as Hugging Face tensors."""
  mlp_norm = "pre_feedforward_layernorm.weight" if cfg.post_norms else "post_attention_layernorm.weight"
  out = []
  for path in _flatten(shapes):
    if path in TOP_TENSORS:
      name, split = TOP_TENSORS[path]
      out.append(Tensor(name, path, None, split))
      continue
    match = re.fullmatch(r"layers(?:_(\d+))?", path[0])
    inner = path[1:]
    if match is None or (inner not in LAYER_TENSORS and inner != ("mlp_norm", "scale")):
      raise HFError(f"parameter {'/'.join(path)} has no Hugging Face counterpart")
    name, split = LAYER_TENSORS.get(inner, (mlp_norm, None))
    if match.group(1) is not None:
      out.append(Tensor(f"model.layers.{match.group(1)}.{name}", path, None, split))
    else:
      out.extend(Tensor(f"model.layers.{i}.{name}", path, i, split) for i in range(cfg.num_layers))
  return out


def _hf_shape(shape: tuple[int, ...], t: Tensor) -> tuple[int, ...]:
  if t.layer is not None:
    shape = shape[1:]
  if t.split is None:
    return tuple(shape)
  return (math.prod(shape[t.split:]), math.prod(shape[:t.split]))


def to_hf(params: dict, cfg: ModelConfig, dtype=np.float32) -> dict[str, np.ndarray]:
  """This project's parameters (numpy) -> Hugging Face tensors by name."""
  flat = _flatten(params)
  out = {}
  for t in tensor_map(cfg, params):
    x = np.asarray(flat[t.path])
    if t.layer is not None:
      x = x[t.layer]
    if t.split is not None:
      x = x.reshape(math.prod(x.shape[:t.split]), -1).T
    out[t.hf_name] = np.ascontiguousarray(x.astype(dtype))
  return out


def from_hf(tensors: Mapping, cfg: ModelConfig, shapes: dict, source: str) -> dict:
  """Hugging Face tensors -> this project's parameter tree with the shapes and dtypes of `shapes`.

  Every expected tensor must be there with its shape; unexpected ones are an error too (a tied
  checkpoint's copy of the embedding as lm_head.weight, and RoPE buffers, excepted).
  """
  expected = tensor_map(cfg, shapes)
  flat_shapes = _flatten(shapes)
  names = {t.hf_name for t in expected}
  missing = sorted(names - set(tensors), key=_natural)
  if missing:
    raise HFError(f"{source} lacks the tensors {missing[:6]}{' ...' if len(missing) > 6 else ''} that this "
                  f"model needs ({len(missing)} in all).")
  ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
  extra = sorted((n for n in set(tensors) - names - ignorable if not n.endswith("rotary_emb.inv_freq")),
                 key=_natural)
  if extra:
    raise HFError(f"{source} has tensors this model does not use: {extra[:6]}"
                  f"{' ...' if len(extra) > 6 else ''} ({len(extra)} in all); the config does not describe "
                  "this checkpoint.")
  wrong = [f"tensor {t.hf_name} has shape {tuple(tensors[t.hf_name].shape)}, the config expects "
           f"{_hf_shape(flat_shapes[t.path].shape, t)} (parameter {'/'.join(t.path)})"
           for t in sorted(expected, key=lambda t: _natural(t.hf_name))
           if tuple(tensors[t.hf_name].shape) != _hf_shape(flat_shapes[t.path].shape, t)]
  if wrong:
    raise HFError(f"{source}: {len(wrong)} tensors do not have the shapes of the config: "
                  f"{'; '.join(wrong[:5])}{'; ...' if len(wrong) > 5 else ''}")
  flat: dict = {}
  for t in expected:
    target = flat_shapes[t.path]
    x = np.asarray(tensors[t.hf_name])
    if t.split is not None:
      layer_shape = target.shape[1:] if t.layer is not None else target.shape
      x = x.T.reshape(layer_shape)
    x = x.astype(target.dtype)
    if t.layer is None:
      flat[t.path] = x
    else:
      flat.setdefault(t.path, np.empty(target.shape, target.dtype))[t.layer] = x
  return _unflatten(flat)


def _natural(name: str):
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------------------
# safetensors files


class LazyTensors(Mapping):
  """name -> tensor of a checkpoint's safetensors files, read on access through a memory map (bfloat16
  included, which safetensors' numpy loader cannot return)."""

  def __init__(self, files: list[str]):
    self._where = {}
    for path in files:
      with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
      header.pop("__metadata__", None)
      self._where.update({name: (path, 8 + size, info) for name, info in header.items()})

  def __getitem__(self, name):
    path, base, info = self._where[name]
    dtype = _numpy_dtype(info["dtype"], name)
    start, end = info["data_offsets"]
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
    return data.view(dtype).reshape(info["shape"])

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)


def _numpy_dtype(name: str, tensor: str):
  if name == "BF16":
    import ml_dtypes  # a dependency of jax

    return ml_dtypes.bfloat16
  if name not in SAFETENSORS_DTYPES:
    raise HFError(f"tensor {tensor} is stored as {name}; this converter reads F32, F16 and BF16.")
  return SAFETENSORS_DTYPES[name]


def read_tensors(hf_dir: str) -> LazyTensors:
  """The tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = ["model.safetensors"]
  paths = [os.path.join(hf_dir, f) for f in files]
  absent = [p for p in paths if not os.path.exists(p)]
  if absent:
    raise HFError(f"{hf_dir}: {absent[0]} does not exist (only safetensors checkpoints are read; convert a "
                  "pytorch_model.bin with transformers' save_pretrained(safe_serialization=True) first).")
  return LazyTensors(paths)


def language_model_tensors(tensors: Mapping, multimodal: bool) -> Mapping:
  """The tensors under the names of a text-only model: Gemma3ForConditionalGeneration's language model
  renamed, its vision tower and projector left out."""
  if not multimodal:
    return tensors
  renamed = {}
  for name in tensors:
    if not name.startswith(MULTIMODAL_SKIPPED):
      old, new = next(((o, n) for o, n in MULTIMODAL_PREFIXES if name.startswith(o)), ("", ""))
      renamed[new + name[len(old):]] = name
  return _Renamed(tensors, renamed)


class _Renamed(Mapping):
  def __init__(self, tensors: Mapping, renamed: dict[str, str]):
    self._tensors, self._renamed = tensors, renamed

  def __getitem__(self, name):
    return self._tensors[self._renamed[name]]

  def __iter__(self):
    return iter(self._renamed)

  def __len__(self):
    return len(self._renamed)


def write_tensors(hf_dir: str, tensors: dict[str, np.ndarray], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
  """model.safetensors, or shards of at most `max_shard_bytes` with the index transformers reads."""
  import safetensors.numpy

  shards: list[dict] = [{}]
  size = 0
  for name in sorted(tensors, key=_natural):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  metadata = {"format": "pt"}  # transformers loads files without it too, but warns
  if len(shards) == 1:
    safetensors.numpy.save_file(shards[0], os.path.join(hf_dir, "model.safetensors"), metadata=metadata)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, os.path.join(hf_dir, file), metadata=metadata)
    weight_map.update({name: file for name in shard})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---------------------------------------------------------------------------------------------------
# LoRA adapters as PEFT names them (a PeftModel of a CausalLM with the default adapter)

_PEFT_MODULE = {"attn": "self_attn", "mlp": "mlp"}


def peft_name(module: str, weight: str, layer: int, half: str) -> str:
  return f"base_model.model.model.layers.{layer}.{_PEFT_MODULE[module]}.{weight}.lora_{half}.default.weight"


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


def from_peft(peft: Mapping[str, np.ndarray], like: dict) -> dict:
  """PEFT's parameters as the project's adapters shaped as `like` (`to_peft`'s inverse)."""
  def convert(module: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    weight, half = name[:-len("_lora_a")], name[-1].upper()
    layers = [peft[peft_name(module, weight, layer, half)].T for layer in range(shape[0])]
    return np.stack([m.reshape(shape[1:]) for m in layers]).astype(np.float32)
  return {"layers": {module: {name: convert(module, name, tuple(leaf.shape)) for name, leaf in weights.items()}
                     for module, weights in like["layers"].items()}}
