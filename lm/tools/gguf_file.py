"""GGUF files (llama.cpp's format) <-> the intermediate lm/tools/hf.py works with: a Hugging Face config.json dict,
Hugging Face-named numpy tensors, and the tokenizer as Hugging Face files.

Read and written with llama.cpp's own `gguf` package (GGUFReader, GGUFWriter, gguf.quants, gguf.SpecialVocab):
no format code here, no torch. The LLaMA architecture only (`general.architecture = llama`: LLaMA 1-3,
Mistral, SmolLM, ...). What llama.cpp's convert_hf_to_gguf.py changes, and this module undoes or redoes:
  - names: `blk.<i>.attn_q.weight` for `model.layers.<i>.self_attn.q_proj.weight` (NAMES below);
  - the rows of q_proj and k_proj: permuted within each head from the halves that Hugging Face rotates
    (`rotate_half`) to the interleaved pairs that llama.cpp rotates (`permute`; `unpermute` undoes it);
  - a tied model has no `output.weight`;
  - the config is metadata (`llama.block_count`, ...), and so is the tokenizer (`tokenizer.ggml.*`: tokens,
    token types, merges, special ids). Read, it becomes the tokenizer.json that transformers' own GGUF
    conversion builds (a GPT-2 style byte-level BPE, `gguf_tokenizer_mapping.byte_level_tokenizer`);
    written, it comes from the tokenizer.json, tokenizer_config.json and chat_template.jinja of an export.
Weights are dequantized to float32 with gguf.quants, as transformers does when it loads a GGUF.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import gguf
import numpy as np

from lm.tools.hf import HFError

ARCH = "llama"
T = gguf.GGMLQuantizationType
# What import dequantizes: the float types and those quantizations that gguf.quants can also write, so
# that each is tested (the K-quants and i-quants are refused, naming the type).
READ_TYPES = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
# export --dtype -> (the type of matrices, general.file_type); vectors (norms) stay F32 as llama.cpp keeps them
WRITE_TYPES = {"float32": (T.F32, gguf.LlamaFileType.ALL_F32), "bfloat16": (T.BF16, gguf.LlamaFileType.MOSTLY_BF16),
               "q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
_M = gguf.MODEL_TENSOR
NAMES = {  # Hugging Face name (<i>: the layer) -> llama.cpp's tensor
    "model.embed_tokens.weight": _M.TOKEN_EMBD, "model.norm.weight": _M.OUTPUT_NORM, "lm_head.weight": _M.OUTPUT,
    "model.layers.<i>.input_layernorm.weight": _M.ATTN_NORM,
    "model.layers.<i>.self_attn.q_proj.weight": _M.ATTN_Q, "model.layers.<i>.self_attn.k_proj.weight": _M.ATTN_K,
    "model.layers.<i>.self_attn.v_proj.weight": _M.ATTN_V, "model.layers.<i>.self_attn.o_proj.weight": _M.ATTN_OUT,
    "model.layers.<i>.post_attention_layernorm.weight": _M.FFN_NORM,
    "model.layers.<i>.mlp.gate_proj.weight": _M.FFN_GATE, "model.layers.<i>.mlp.up_proj.weight": _M.FFN_UP,
    "model.layers.<i>.mlp.down_proj.weight": _M.FFN_DOWN,
}
# tokenizer.ggml.pre -> the split expression transformers' GGUF conversion pre-tokenizes with
# (gguf_tokenizer_mapping.GGUF_PRE_TOKENIZER_SPLITS); any other name splits as GPT-2 (ByteLevel's own).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {  # the first name of each expression is the one export writes
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    "tekken": _TEKKEN, **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35, **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}
SPECIAL_TOKENS = {"bos_token": gguf.Keys.Tokenizer.BOS_ID, "eos_token": gguf.Keys.Tokenizer.EOS_ID,
                  "unk_token": gguf.Keys.Tokenizer.UNK_ID, "pad_token": gguf.Keys.Tokenizer.PAD_ID}


@dataclasses.dataclass
class GGUFModel:
  """A GGUF file as Hugging Face pieces: config.json, tensors by name (dequantized when read), tokenizer
  files by name (empty when the file has no tokenizer this module reads) and the tensor types found."""
  config: dict
  tensors: Mapping
  tokenizer_files: dict[str, str]
  types: dict[str, int]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute: within each head, rows (halves) -> (interleaved pairs)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """The inverse of `permute`: llama.cpp's q/k rows back to Hugging Face's."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------
# reading


def read(path: str) -> GGUFModel:
  """The model of a LLaMA-architecture GGUF file; HFError for anything else or a damaged file."""
  reader = _reader(path)
  fields = {name: field.contents() for name, field in reader.fields.items()}
  config = hf_config(fields, {t.name for t in reader.tensors}, path)
  types: dict[str, int] = {}
  for t in reader.tensors:
    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
  unread = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in READ_TYPES})
  if unread:
    first = next(t.name for t in reader.tensors if t.tensor_type.name == unread[0])
    raise HFError(f"{path} stores tensors as {', '.join(unread)} (e.g. {first}); this converter reads "
                  f"{', '.join(t.name for t in READ_TYPES)}. Convert it with llama.cpp's llama-quantize "
                  "(e.g. to Q8_0) first.")
  return GGUFModel(config, _Tensors(reader.tensors, config, path), tokenizer_files(fields, path), types)


def _reader(path: str) -> gguf.GGUFReader:
  if not os.path.isfile(path):
    raise HFError(f"{path} does not exist.")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader reports a damaged file through whatever numpy or struct raise on it
    raise HFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); a truncated or interrupted "
                  "download, or another format?") from e


def hf_config(fields: dict, tensor_names: set[str], path: str) -> dict:
  """config.json of LlamaForCausalLM from the `llama.*` metadata (absent keys: llama.cpp's defaults)."""
  arch = fields.get(gguf.Keys.General.ARCHITECTURE)
  if arch != ARCH:
    raise HFError(f"{path}: general.architecture = {arch!r}; this converter reads GGUF files of the "
                  f"{ARCH!r} architecture only (LLaMA, Mistral, SmolLM and others that llama.cpp converts as it).")
  key = lambda name, *default: _field(fields, name.format(arch=ARCH), path, *default)  # noqa: E731
  d_model, heads = key(gguf.Keys.LLM.EMBEDDING_LENGTH), key(gguf.Keys.Attention.HEAD_COUNT)
  head_dim = key(gguf.Keys.Attention.KEY_LENGTH, None) or key(gguf.Keys.Rope.DIMENSION_COUNT, None) or d_model // heads
  for name in (gguf.Keys.Rope.DIMENSION_COUNT, gguf.Keys.Attention.VALUE_LENGTH):
    if key(name, head_dim) != head_dim:
      raise HFError(f"{path}: {name.format(arch=ARCH)} = {key(name)} but the heads have {head_dim} dimensions; "
                    "this project rotates and attends over whole heads.")
  if key(gguf.Keys.LLM.EXPERT_COUNT, 0):
    raise HFError(f"{path}: a mixture of experts ({key(gguf.Keys.LLM.EXPERT_COUNT)} experts); this project "
                  "implements dense MLPs only.")
  if gguf.TENSOR_NAMES[_M.ROPE_FREQS] + ".weight" in tensor_names:
    raise HFError(f"{path} has rope_freqs.weight (LLaMA 3.1-style RoPE frequency factors), which this project "
                  "does not implement.")
  scaling = key(gguf.Keys.Rope.SCALING_TYPE, "none")
  if scaling not in ("none", "linear"):
    raise HFError(f"{path}: {gguf.Keys.Rope.SCALING_TYPE.format(arch=ARCH)} = {scaling!r}; this project implements "
                  "linear RoPE scaling only.")
  tokens = fields.get(gguf.Keys.Tokenizer.LIST)
  vocab_size = key(gguf.Keys.LLM.VOCAB_SIZE, len(tokens) if tokens else None)
  if vocab_size is None:
    raise HFError(f"{path} has neither {ARCH}.vocab_size nor a tokenizer: its vocabulary size is unknown.")
  return dict(
      architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab_size, hidden_size=d_model,
      intermediate_size=key(gguf.Keys.LLM.FEED_FORWARD_LENGTH), num_hidden_layers=key(gguf.Keys.LLM.BLOCK_COUNT),
      num_attention_heads=heads, num_key_value_heads=key(gguf.Keys.Attention.HEAD_COUNT_KV, heads),
      head_dim=head_dim, max_position_embeddings=key(gguf.Keys.LLM.CONTEXT_LENGTH, 4096),
      rms_norm_eps=key(gguf.Keys.Attention.LAYERNORM_RMS_EPS, 1e-5), rope_theta=key(gguf.Keys.Rope.FREQ_BASE, 10_000.0),
      rope_scaling=None if scaling == "none" else {"rope_type": scaling,
                                                   "factor": key(gguf.Keys.Rope.SCALING_FACTOR, 1.0)},
      tie_word_embeddings=gguf.TENSOR_NAMES[_M.OUTPUT] + ".weight" not in tensor_names, hidden_act="silu",
      attention_bias=False, mlp_bias=False,
      bos_token_id=fields.get(gguf.Keys.Tokenizer.BOS_ID), eos_token_id=fields.get(gguf.Keys.Tokenizer.EOS_ID))


def _field(fields: dict, name: str, path: str, *default):
  """A metadata value; one value per layer (some files write lists) must be the same for every layer."""
  if name not in fields:
    if default:
      return default[0]
    raise HFError(f"{path} lacks the metadata key {name}, which a {ARCH} GGUF file has.")
  value = fields[name]
  if isinstance(value, list):
    if len(set(value)) != 1:
      raise HFError(f"{path}: {name} = {value} differs between layers; this project builds identical layers.")
    value = value[0]
  return value


class _Tensors(Mapping):
  """Hugging Face name -> a `_Dequantized` tensor of the file: read and dequantized when numpy asks."""

  def __init__(self, tensors, config: dict, path: str):
    names = {}
    for hf_name, kind in NAMES.items():
      layers = range(config["num_hidden_layers"]) if "<i>" in hf_name else [None]
      for i in layers:
        names[gguf.TENSOR_NAMES[kind].format(bid=i) + ".weight"] = hf_name.replace("<i>", str(i))
    unknown = [t.name for t in tensors if t.name not in names]
    if unknown:
      raise HFError(f"{path} has tensors a {ARCH} model of this project does not have: {unknown[:6]}"
                    f"{' ...' if len(unknown) > 6 else ''} ({len(unknown)} in all).")
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    self._tensors = {}
    for t in tensors:
      hf_name = names[t.name]
      self._tensors[hf_name] = _Dequantized(t, next((n for p, n in heads.items() if f".{p}." in hf_name), None))

  def __getitem__(self, name):
    return self._tensors[name]

  def __iter__(self):
    return iter(self._tensors)

  def __len__(self):
    return len(self._tensors)


class _Dequantized:
  """One tensor of the file in Hugging Face's layout (`out x in`), float32 when numpy reads it."""

  def __init__(self, tensor, heads: int | None):
    self._tensor, self._heads = tensor, heads
    self.shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    self.dtype = np.dtype(np.float32)

  def __array__(self, dtype=None, copy=None):
    x = gguf.quants.dequantize(self._tensor.data, self._tensor.tensor_type).reshape(self.shape)
    if self._heads is not None:
      x = unpermute(x, self._heads)
    return np.asarray(x, dtype=dtype or np.float32)


# ---------------------------------------------------------------------------------------------------------
# the tokenizer, read


def tokenizer_files(fields: dict, path: str) -> dict[str, str]:
  """tokenizer.json, tokenizer_config.json, chat_template.jinja (when the file has a template) and
  generation_config.json, as transformers builds them from the file; {} without a GPT-2 style tokenizer."""
  model = fields.get(gguf.Keys.Tokenizer.MODEL)
  if model != "gpt2" or gguf.Keys.Tokenizer.LIST not in fields:
    return {}
  tokens = fields[gguf.Keys.Tokenizer.LIST]
  special = {name: tokens[fields[key]] if fields.get(key) is not None else None
             for name, key in SPECIAL_TOKENS.items()}
  add = {f"add_{t}_token": bool(fields.get(getattr(gguf.Keys.Tokenizer, f"ADD_{t.upper()}"), False))
         for t in ("bos", "eos")}
  files = {"tokenizer.json": _tokenizer_json(fields, special, add),
           "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special, **add},
                                               indent=2) + "\n",
           "generation_config.json": json.dumps({k: fields[v] for k, v in (
               ("bos_token_id", gguf.Keys.Tokenizer.BOS_ID), ("eos_token_id", gguf.Keys.Tokenizer.EOS_ID),
               ("pad_token_id", gguf.Keys.Tokenizer.PAD_ID)) if v in fields}, indent=2) + "\n"}
  template = fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
  if isinstance(template, str):
    files["chat_template.jinja"] = template
  return files


def _tokenizer_json(fields: dict, special: dict, add: dict) -> str:
  """transformers' `byte_level_tokenizer` + `add_gguf_special_tokens` + `set_split_regex`, and the special
  tokens and post-processor its TokenizersBackend adds, as a tokenizer.json."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

  tokens, types = fields[gguf.Keys.Tokenizer.LIST], fields.get(gguf.Keys.Tokenizer.TOKEN_TYPE) or []
  spelling = gguf.vocab.bytes_to_unicode()
  alphabet = set(spelling.values())
  # Tokens are stored as text; a byte-level vocabulary spells them in its byte alphabet.
  vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
           for i, t in enumerate(tokens)}
  merges = [tuple(m.split(" ")) for m in fields.get(gguf.Keys.Tokenizer.MERGES) or []]
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                             end_of_word_suffix="", fuse_unk=False))
  split = PRE_TOKENIZER_SPLITS.get(fields.get(gguf.Keys.Tokenizer.PRE))
  tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(split), behavior="isolated"),
       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
  tok.decoder = decoders.ByteLevel()
  # GPT2Tokenizer's default special token, then the file's control tokens (a control token outside the byte
  # alphabet is a llama.cpp mislabel, skipped), its user-defined ones, and the named special tokens.
  control = ["<|endoftext|>"] * ("<|endoftext|>" in vocab) + [
      t for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL and set(t) <= alphabet]
  user = [t for t, kind in zip(tokens, types) if kind == gguf.TokenType.USER_DEFINED and t in vocab]
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
  tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
  tok.add_special_tokens([AddedToken(t, special=True) for t in special.values()
                          if t is not None and t in vocab and t not in control + user])
  bos, eos = ([special[f"{end}_token"]] if add[f"add_{end}_token"] and special[f"{end}_token"] in vocab else []
              for end in ("bos", "eos"))
  single = " ".join([f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos])
  pair = " ".join([single] + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos])
  tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                     special_tokens=[(t, vocab[t]) for t in bos + eos])
  return tok.to_str(pretty=True)


# ---------------------------------------------------------------------------------------------------------
# writing


def write(path: str, config: dict, tensors: Mapping, dtype: str, tokenizer_dir: str | None, name: str) -> list[str]:
  """A llama.cpp GGUF file of a LlamaForCausalLM config.json and its Hugging Face tensors (float32): matrices
  as `dtype` (WRITE_TYPES), vectors as F32, with the tokenizer of `tokenizer_dir` when it has a GPT-2 style
  one. Written to a temporary name first, so `path` is either complete or absent. Returns warnings."""
  if config.get("architectures") != ["LlamaForCausalLM"]:
    raise HFError(f"GGUF export writes the {ARCH!r} architecture (LlamaForCausalLM); this model exports to "
                  f"{config.get('architectures')}. Export it as a Hugging Face directory (--format=hf) instead.")
  matrix_type, file_type = WRITE_TYPES[dtype]
  writer = gguf.GGUFWriter(path + ".partial", ARCH)
  writer.add_type(gguf.GGUFType.MODEL)
  writer.add_name(name)
  _add_hyperparameters(writer, config)
  writer.add_file_type(file_type)
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  warnings = _add_tokenizer(writer, tokenizer_dir, config["vocab_size"])
  fallback = []
  for hf_name in sorted(tensors, key=_order):
    gguf_name, x = _gguf_tensor(hf_name, np.asarray(tensors[hf_name], np.float32), config)
    qtype = matrix_type if x.ndim == 2 else T.F32
    if qtype == T.Q8_0 and x.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
      qtype = T.F32  # rows must be whole blocks of 32; llama.cpp's converter falls back the same way (to F16)
      fallback.append(gguf_name)
    data = gguf.quants.quantize(x, qtype)
    writer.add_tensor(gguf_name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
  if fallback:
    warnings.append(f"{len(fallback)} matrices have rows that are not whole Q8_0 blocks and are written as F32: "
                    f"{fallback[:4]}{' ...' if len(fallback) > 4 else ''}")
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(path + ".partial", path)
  return warnings


def _add_hyperparameters(writer: gguf.GGUFWriter, hf: dict) -> None:
  writer.add_vocab_size(hf["vocab_size"])
  writer.add_context_length(hf["max_position_embeddings"])
  writer.add_embedding_length(hf["hidden_size"])
  writer.add_block_count(hf["num_hidden_layers"])
  writer.add_feed_forward_length(hf["intermediate_size"])
  writer.add_head_count(hf["num_attention_heads"])
  writer.add_head_count_kv(hf["num_key_value_heads"])
  writer.add_key_length(hf["head_dim"])
  writer.add_value_length(hf["head_dim"])
  writer.add_rope_dimension_count(hf["head_dim"])
  writer.add_rope_freq_base(hf["rope_theta"])
  writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
  scaling = hf.get("rope_scaling")
  if scaling:  # hf.hf_config writes linear scaling only
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(scaling["factor"])


def _gguf_tensor(hf_name: str, x: np.ndarray, config: dict) -> tuple[str, np.ndarray]:
  """(llama.cpp's name, the tensor with q/k rows permuted as llama.cpp rotates them)."""
  parts = hf_name.split(".")
  layer = parts[2] if hf_name.startswith("model.layers.") else None
  template = hf_name if layer is None else ".".join(parts[:2] + ["<i>"] + parts[3:])
  if template not in NAMES:
    raise HFError(f"tensor {hf_name} has no llama.cpp counterpart.")
  if template.endswith("q_proj.weight"):
    x = permute(x, config["num_attention_heads"])
  elif template.endswith("k_proj.weight"):
    x = permute(x, config["num_key_value_heads"])
  return gguf.TENSOR_NAMES[NAMES[template]].format(bid=layer) + ".weight", x


def _order(hf_name: str):
  """llama.cpp's order: the embedding, the layers in turn, then the final norm and the head."""
  parts = hf_name.split(".")
  if hf_name.startswith("model.layers."):
    return (1, int(parts[2]), hf_name)
  return (0 if "embed" in hf_name else 2, 0, hf_name)


def _add_tokenizer(writer: gguf.GGUFWriter, directory: str | None, vocab_size: int) -> list[str]:
  """The tokenizer of `directory` as `tokenizer.ggml.*` metadata (a GPT-2 style byte-level BPE
  tokenizer.json: tokens, types, merges, special ids, add_bos/add_eos, chat template); without one, a
  warning that the file lacks a tokenizer."""
  lacks = "the GGUF file has no tokenizer, which llama.cpp needs to run it"
  path = os.path.join(directory, "tokenizer.json") if directory else None
  if path is None or not os.path.isfile(path):
    return [f"no tokenizer.json to export: {lacks}."]
  with open(path) as f:
    spec = json.load(f)
  model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
  if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
    return [f"{path} is a {model.get('type')} tokenizer with a {decoder.get('type')} decoder, not a GPT-2 style "
            f"byte-level BPE (the one this export writes): {lacks}."]
  added = spec.get("added_tokens") or []
  largest = max([*model["vocab"].values(), *(a["id"] for a in added)])
  if largest >= vocab_size:
    raise HFError(f"{path} has token id {largest}, past the model's vocab_size {vocab_size}.")
  tokens: list = [None] * vocab_size
  types = [gguf.TokenType.NORMAL] * vocab_size
  for token, i in model["vocab"].items():
    tokens[i] = token
  for a in added:
    tokens[a["id"]] = a["content"]
    types[a["id"]] = gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
  for i, t in enumerate(tokens):  # rows of the embedding that no token uses: llama.cpp's [PAD<id>] tokens
    if t is None or t == f"[PAD{i}]":
      tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
  writer.add_tokenizer_model("gpt2")
  pre, warnings = _pre_name(spec.get("pre_tokenizer"), path)
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
  return warnings


def _pre_name(pre: dict | None, path: str) -> tuple[str, list[str]]:
  """tokenizer.ggml.pre for a tokenizer.json pre-tokenizer: llama.cpp splits text by this name."""
  steps = (pre or {}).get("pretokenizers") or [pre or {}]
  kinds = [s.get("type") for s in steps]
  if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
    return "gpt-2", []
  if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
    return "smollm", []
  if kinds == ["Split", "ByteLevel"]:
    regex = (steps[0].get("pattern") or {}).get("Regex")
    name = next((n for n, r in PRE_TOKENIZER_SPLITS.items() if r == regex), None)
    if name is not None:
      return name, []
  return "default", [f"{path}: llama.cpp has no name for its pre-tokenizer ({kinds}); the GGUF file says "
                     "'default', with which llama.cpp may split some text differently."]
