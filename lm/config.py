"""Typed configuration: the one place a ConfigDict becomes frozen dataclasses, and their validation.

Library code takes the narrow dataclass it needs (`ModelConfig`, `DataConfig`, ...), never the ConfigDict.
Every check raises `ConfigError` with the key at fault and what would fix it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import ml_collections

from lm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_seq_len: int
  rope_theta: float
  rope_scaling_factor: float
  sliding_window: int
  local_layers_per_global: int
  rope_local_theta: float
  qk_norm: bool
  post_norms: bool
  norm_unit_offset: bool
  mlp_activation: str
  embed_scale: bool
  query_scale_dim: int
  norm_eps: float
  tie_embeddings: bool
  init_std: float
  dtype: str
  param_dtype: str
  remat: str
  scan_layers: bool
  attention: str
  logits_chunk: int
  lora_rank: int
  lora_alpha: float
  lora_targets: str


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  name: str  # its key in config.data.sources
  kind: str
  path: str
  text_field: str
  validation: str
  validation_fraction: float
  separator: str
  train_split: str
  weight: float
  max_documents: int


@dataclasses.dataclass(frozen=True)
class DataConfig:
  sources: tuple[SourceConfig, ...]
  data_dir: str
  tokenizer: str
  tokenizer_path: str
  tokenizer_sample_bytes: int
  eval_split: str
  eval_sequences: int
  workers: int
  shard_tokens: int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int
  seq_len: int
  micro_batch_size: int
  gradient_accumulation_steps: int
  num_train_steps: int
  num_epochs: int
  optimizer: str
  learning_rate: float
  warmup_steps: int
  schedule: str
  final_learning_rate_ratio: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  max_grad_norm: float
  checkpoint_dir: str
  init_from: str
  save_interval_steps: int
  max_to_keep: int
  eval_interval_steps: int
  log_interval_steps: int
  wandb_project: str
  peak_flops_per_device: float
  deterministic: bool
  skip_nonfinite_updates: bool
  local_accumulation: bool
  batch_invariant: bool
  batch_invariant_rows: int
  profile_steps: str
  allow_data_change: bool


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int
  fsdp: int
  tensor: int
  dcn_data: int
  dcn_fsdp: int
  dcn_tensor: int


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  enabled: bool
  num_generations: int
  num_iterations: int
  beta: float
  kl_bias_correction: bool
  epsilon: float
  max_completion_tokens: int
  temperature: float
  task: str
  max_operand: int
  dataset: str
  rewards: str
  eval_prompts: int
  chat: bool
  system_prompt: str


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig
  grpo: GRPOConfig


MODEL_NAMES = ("llama", "qwen3", "gemma3")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
# ModelConfig fields that are settings of a run, not part of the model that parameters belong to: they may
# differ between the run that wrote parameters and one that starts from them.
MODEL_RUN_SETTINGS = ("max_seq_len", "init_std", "dtype", "param_dtype", "remat", "scan_layers", "attention",
                      "logits_chunk", "lora_rank", "lora_alpha", "lora_targets")
# Keys added after checkpoints were first written, with the value those checkpoints had.
ADDED_KEYS = {"model.rope_scaling_factor": 1.0, "model.sliding_window": 0, "model.local_layers_per_global": 0,
              "model.rope_local_theta": 10000.0, "model.qk_norm": False, "model.post_norms": False,
              "model.norm_unit_offset": False, "model.mlp_activation": "silu", "model.embed_scale": False,
              "model.query_scale_dim": 0, "model.lora_rank": 0, "model.lora_alpha": 16.0,
              "model.lora_targets": "q,k,v,o,gate,up,down", "model.logits_chunk": 0}


# Float settings of a model agree within this relative tolerance: a Hugging Face config.json written from
# float32 holds norm_eps = 9.999999747378752e-06 where a config says 1e-5.
SETTING_RTOL = 1e-6


def same_setting(a, b) -> bool:
  """Whether two values of a config key mean the same: floats within SETTING_RTOL (relative), sequences
  element by element, anything else equal."""
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(map(same_setting, a, b))
  numbers = (int, float)
  if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
    return a == b or math.isclose(a, b, rel_tol=SETTING_RTOL)
  return a == b


DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION = ("auto", "xla", "splash", "cudnn")  # lm/model/attention.py
OPTIMIZERS = ("adamw", "lion")
SCHEDULES = ("cosine", "linear", "constant")
TOKENIZERS = ("sentencepiece", "huggingface", "byte")
SOURCE_KINDS = ("text_files", "jsonl", "chat", "parquet", "text", "tfds")
EVAL_SPLITS = ("validation", "train")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # lm/model/lora.py
# Token ids and positions are int32 in the model (prepared tokens take 2 bytes up to 65,536 ids, 4 above).
MAX_INT32 = 2**31 - 1
# Source keys that only some kinds read: {key: (the kinds that read it, its default in configs/base.py's
# source())}. Another value on a source of another kind is refused: it would do nothing, yet name a new
# preparation of the source (the settings key holds every key).
KIND_KEYS = {"text_field": (("jsonl", "parquet", "tfds"), "text"), "separator": (("text",), ""),
             "train_split": (("tfds",), "train")}


def _section(cls, section: str, values: ml_collections.ConfigDict):
  """Builds one dataclass, checking that the keys and their types match the declaration."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  given = dict(values)
  missing = sorted(set(fields) - set(given))
  unknown = sorted(set(given) - set(fields))
  if missing or unknown:
    raise ConfigError(
        f"config.{section}: missing keys {missing}, unknown keys {unknown}. Start the config from "
        "configs/base.py (`c = base.get_config()`) so every key is declared once.")
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in given.items():
    kind = hints[name]
    if not isinstance(kind, type):  # a nested section, built and checked by its caller
      kwargs[name] = value
      continue
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"config.{section}.{name} = {value} is not a finite number. Give a finite value in "
                        f"the config file or the --config.{section}.{name} override.")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      raise ConfigError(
          f"config.{section}.{name} = {value!r} is a {type(value).__name__}; it must be a "
          f"{kind.__name__}. Fix the value in the config file or the --config.{section}.{name} override.")
    kwargs[name] = value
  return cls(**kwargs)


def _data_section(values: ml_collections.ConfigDict) -> DataConfig:
  """The data section, whose `sources` (a ConfigDict of named sources) each become a SourceConfig."""
  sources = values.get("sources")
  if not isinstance(sources, ml_collections.ConfigDict) or not len(sources):
    raise ConfigError("config.data.sources must hold at least one named source; start from configs/base.py "
                      "(`c.data.sources.main = base.source(kind=..., path=...)`).")
  named = []
  for name, source in sources.items():
    if not isinstance(source, ml_collections.ConfigDict):
      raise ConfigError(f"config.data.sources.{name} = {source!r} is not a source; make it with "
                        "configs/base.py's base.source(kind=..., path=...).")
    named.append(_section(SourceConfig, f"data.sources.{name}", {"name": name, **dict(source)}))
  return _section(DataConfig, "data", {**dict(values), "sources": tuple(named)})


def from_config_dict(c: ml_collections.ConfigDict) -> Config:
  """The single ConfigDict -> dataclass conversion, validated."""
  sections = {f.name: f.type for f in dataclasses.fields(Config)}
  unknown = sorted(set(c.keys()) - set(sections))
  if unknown:
    raise ConfigError(f"config has unknown sections {unknown}; the sections are {sorted(sections)}.")
  hints = typing.get_type_hints(Config)
  config = Config(**{name: _section(hints[name], name, c[name]) if name != "data" else _data_section(c.data)
                     for name in sections})
  validate(config)
  return config


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _one_of(section: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
  _require(value in allowed,
           f"config.{section}.{key} = {value!r} is not known; choose one of {', '.join(allowed)}.")


def _positive(section: str, obj, *keys: str) -> None:
  for key in keys:
    value = getattr(obj, key)
    _require(value > 0, f"config.{section}.{key} = {value} must be > 0.")


def profile_step_range(value: str) -> range | None:
  """config.train.profile_steps as the optimizer steps it names (numbered from 1, as in the log); None
  when it is empty."""
  if not value.strip():
    return None
  where = f"config.train.profile_steps = {value!r}"
  fix = ("Write START:END for the optimizer steps START to END - 1 as the log numbers them (END exclusive, "
         "as in a Python slice): \"10:13\" traces steps 10, 11 and 12. Leave it empty for no profile.")
  match = re.fullmatch(r"\s*(-?\d+)\s*:\s*(-?\d+)\s*", value)
  _require(match is not None, f"{where} is not START:END. {fix}")
  start, end = int(match[1]), int(match[2])
  _require(start >= 1, f"{where}: steps are numbered from 1, as in the log; {start} is not a step. {fix}")
  _require(start < end, f"{where}: START must be below END, which is excluded; it names no step. {fix}")
  return range(start, end)


def validate_model(m: ModelConfig) -> None:
  """The checks of the model section alone (also for models read from other formats)."""
  _one_of("model", "name", m.name, MODEL_NAMES)
  _one_of("model", "dtype", m.dtype, DTYPES)
  _one_of("model", "param_dtype", m.param_dtype, DTYPES)
  _one_of("model", "remat", m.remat, REMAT_POLICIES)
  _one_of("model", "attention", m.attention, ATTENTION)
  _one_of("model", "mlp_activation", m.mlp_activation, MLP_ACTIVATIONS)
  _positive("model", m, "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "mlp_dim", "max_seq_len", "rope_theta", "rope_scaling_factor", "rope_local_theta", "norm_eps",
            "init_std")
  _require(m.vocab_size <= MAX_INT32,
           f"config.model.vocab_size = {m.vocab_size:,} is over {MAX_INT32:,}, the most ids the model holds "
           "(token ids are int32; prepared tokens take 2 bytes each up to 65,536 ids, 4 above). Vocabularies of "
           "real models have 32,000 to 262,144 ids.")
  _require(m.max_seq_len <= MAX_INT32,
           f"config.model.max_seq_len = {m.max_seq_len:,} is over {MAX_INT32:,}, the longest sequence the "
           "model can number (positions are int32); models are trained on 2,048 to 131,072 tokens. Lower "
           "model.max_seq_len and train.seq_len.")
  _require(m.sliding_window >= 0 and m.local_layers_per_global >= 0 and m.query_scale_dim >= 0,
           "config.model.sliding_window, config.model.local_layers_per_global and "
           "config.model.query_scale_dim must be >= 0 (0 = off).")
  _require((m.sliding_window > 0) == (m.local_layers_per_global > 0),
           f"config.model.sliding_window = {m.sliding_window} and config.model.local_layers_per_global = "
           f"{m.local_layers_per_global}: set both (local sliding-window layers between global ones) or "
           "neither (every layer global).")
  _require(m.num_heads % m.num_kv_heads == 0,
           f"config.model.num_heads = {m.num_heads} is not divisible by config.model.num_kv_heads = "
           f"{m.num_kv_heads}; grouped-query attention shares each key/value head among an equal number "
           "of query heads. Pick num_kv_heads among the divisors of num_heads.")
  _require(m.head_dim % 2 == 0, f"config.model.head_dim = {m.head_dim} must be even for rotary embeddings.")
  _require(m.init_std <= 1.0,
           f"config.model.init_std = {m.init_std:g} is over 1: every weight is drawn with this standard "
           "deviation, and weights that large make the activations and the loss blow up (to inf or NaN at the "
           f"first step). Usual values are 0.02 (configs/base.py) or about 1/sqrt(d_model) = {m.d_model ** -0.5:.3g}.")
  _require(m.logits_chunk >= 0, f"config.model.logits_chunk = {m.logits_chunk} must be >= 0 (0 = the logits of "
           "the whole sequence at once).")
  _validate_lora(m)


def _validate_lora(m: ModelConfig) -> None:
  _require(m.lora_rank >= 0, f"config.model.lora_rank = {m.lora_rank} must be >= 0 (0 = no LoRA: train all "
                             "parameters).")
  if not m.lora_rank:
    return
  _positive("model", m, "lora_alpha")
  names = [t.strip() for t in m.lora_targets.split(",") if t.strip()]
  unknown = [t for t in names if t not in LORA_TARGETS]
  _require(names and not unknown,
           f"config.model.lora_targets = {m.lora_targets!r}: {'names ' + str(unknown) if unknown else 'names none'}"
           f"; give a comma-separated list of the projections to adapt among {', '.join(LORA_TARGETS)}.")


def validate_data(d: DataConfig) -> None:
  _one_of("data", "tokenizer", d.tokenizer, TOKENIZERS)
  _require(d.tokenizer != "huggingface" or d.tokenizer_path != "",
           "config.data.tokenizer = 'huggingface' needs config.data.tokenizer_path: a tokenizer.json, or the "
           "directory holding it (scripts/convert_hf.py import copies it beside the weights).")
  _one_of("data", "eval_split", d.eval_split, EVAL_SPLITS)
  _require(d.eval_sequences >= 0, f"config.data.eval_sequences = {d.eval_sequences} must be >= 0 (0 = the "
                                  "whole split).")
  _require(d.workers >= 0, f"config.data.workers = {d.workers} must be >= 0 (0 = one per CPU core).")
  _positive("data", d, "tokenizer_sample_bytes", "shard_tokens")
  for src in d.sources:
    where = f"config.data.sources.{src.name}"
    _one_of(f"data.sources.{src.name}", "kind", src.kind, SOURCE_KINDS)
    _require(src.kind in ("text_files", "tfds") or src.path != "",
             f"{where}.path is empty; give the comma-separated globs of its {src.kind} files.")
    _require(src.kind != "tfds" or src.path != "", f"{where}.path is empty; give the TFDS dataset name.")
    _require(src.validation != "" or 0.0 < src.validation_fraction < 1.0,
             f"{where}.validation_fraction = {src.validation_fraction} must be in (0, 1): the share of the "
             "documents held out for validation (or name validation files, and it is unused).")
    _require(src.validation == "" or 0.0 <= src.validation_fraction < 1.0,
             f"{where}.validation_fraction = {src.validation_fraction} must be in [0, 1) (unused: "
             f"{where}.validation names the validation documents).")
    _validate_kind_keys(src)
    _require(src.max_documents >= 0, f"{where}.max_documents = {src.max_documents} must be >= 0 (0 = all).")
    _require(src.weight >= 0.0 and src.weight != float("inf"),
             f"{where}.weight = {src.weight} must be a finite number >= 0 (its share of the training rows).")
  _require(sum(src.weight for src in d.sources) > 0,
           "config.data.sources: every weight is 0, so no source would give training rows; give at least one "
           "source a weight > 0.")


def _validate_kind_keys(src: SourceConfig) -> None:
  """A key that the source's kind does not read must keep its default (see KIND_KEYS)."""
  for key, (kinds, default) in KIND_KEYS.items():
    value = getattr(src, key)
    _require(src.kind in kinds or value == default,
             f"config.data.sources.{src.name}.{key} = {value!r} does nothing for a {src.kind} source (its kind): "
             f"only {' and '.join(kinds)} sources read {key}. Remove the override (its default is {default!r}), "
             "or set the source's kind.")


def validate(config: Config) -> None:
  """Checks everything that can be checked without devices or data."""
  d, t, mesh = config.data, config.train, config.mesh
  m = config.model
  validate_model(m)

  validate_data(d)

  _one_of("train", "optimizer", t.optimizer, OPTIMIZERS)
  _one_of("train", "schedule", t.schedule, SCHEDULES)
  _positive("train", t, "seq_len", "micro_batch_size", "gradient_accumulation_steps", "learning_rate",
            "save_interval_steps", "max_to_keep", "eval_interval_steps", "log_interval_steps")
  _require(t.seq_len <= m.max_seq_len,
           f"config.train.seq_len = {t.seq_len} is over config.model.max_seq_len = {m.max_seq_len}; "
           "lower train.seq_len or raise model.max_seq_len.")
  _require(not m.logits_chunk or t.seq_len <= m.logits_chunk or t.seq_len % m.logits_chunk == 0,
           f"config.model.logits_chunk = {m.logits_chunk} does not divide config.train.seq_len = {t.seq_len}: the "
           "loss computes the logits that many positions at a time. Give it a divisor of seq_len (or 0: all "
           "at once).")
  _require(t.num_train_steps >= 0 and t.num_epochs >= 0,
           "config.train.num_train_steps and config.train.num_epochs must be >= 0.")
  _require((t.num_train_steps > 0) != (t.num_epochs > 0),
           f"config.train.num_train_steps = {t.num_train_steps} and config.train.num_epochs = "
           f"{t.num_epochs}: set exactly one of them (the other to 0).")
  _require(t.warmup_steps >= 0, f"config.train.warmup_steps = {t.warmup_steps} must be >= 0.")
  _require(t.num_train_steps == 0 or t.warmup_steps < t.num_train_steps,
           f"config.train.warmup_steps = {t.warmup_steps} is not below config.train.num_train_steps = "
           f"{t.num_train_steps}: the learning rate would never leave warmup. Lower warmup_steps.")
  _require(t.eps > 0.0, f"config.train.eps = {t.eps} must be > 0 (it keeps AdamW's division finite).")
  _require(t.seed >= 0, f"config.train.seed = {t.seed} must be >= 0.")
  _require(0.0 <= t.final_learning_rate_ratio <= 1.0,
           f"config.train.final_learning_rate_ratio = {t.final_learning_rate_ratio} must be in [0, 1].")
  _require(t.weight_decay >= 0.0, f"config.train.weight_decay = {t.weight_decay} must be >= 0.")
  _require(0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0,
           f"config.train.b1 = {t.b1} and config.train.b2 = {t.b2} must be in [0, 1).")
  _require(t.max_grad_norm >= 0.0, f"config.train.max_grad_norm = {t.max_grad_norm} must be >= 0 (0 = off).")
  _require(t.peak_flops_per_device >= 0.0,
           f"config.train.peak_flops_per_device = {t.peak_flops_per_device} must be >= 0 (0 = auto).")
  _require(len(t.wandb_project) <= 128 and not set(t.wandb_project) & set("/\\#?%:"),
           f"config.train.wandb_project = {t.wandb_project!r}: a Weights & Biases project name has at most "
           "128 characters and none of / \\ # ? % : (the entity comes from `wandb login` or WANDB_ENTITY).")
  profile_step_range(t.profile_steps)
  if config.grpo.enabled:
    validate_grpo(config.grpo)

  sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
  _require(all(v == -1 or v > 0 for v in sizes.values()) and list(sizes.values()).count(-1) <= 1,
           f"config.mesh = {sizes}: each axis must be a positive size, and at most one may be -1 "
           "(all remaining devices).")
  hosts = {"dcn_data": mesh.dcn_data, "dcn_fsdp": mesh.dcn_fsdp, "dcn_tensor": mesh.dcn_tensor}
  _require(all(v == -1 or v > 0 for v in hosts.values()) and list(hosts.values()).count(-1) <= 1,
           f"config.mesh = {hosts}: each must be a positive number of processes, and at most one may be -1 "
           "(all remaining processes).")


def validate_grpo(g: GRPOConfig) -> None:
  _require(g.num_generations >= 2,
           f"config.grpo.num_generations = {g.num_generations}: GRPO normalises each completion's reward within "
           "the group of completions of its prompt, which needs at least 2 (4-16 are usual).")
  _require(g.beta >= 0.0, f"config.grpo.beta = {g.beta} must be >= 0 (0 = no KL penalty).")
  _require(0.0 < g.epsilon < 1.0, f"config.grpo.epsilon = {g.epsilon} must be in (0, 1) (the ratio's clip).")
  _require(g.temperature > 0.0, f"config.grpo.temperature = {g.temperature} must be > 0: GRPO needs the "
                                "completions of a prompt to differ (sampling, not greedy decoding).")
  _positive("grpo", g, "num_iterations", "max_completion_tokens", "max_operand", "eval_prompts")
  _require(bool(g.rewards.strip()), "config.grpo.rewards is empty; name at least one reward function "
                                    "(module.function, comma-separated), e.g. lm.training.rewards.exact_answer.")


def to_dict(config: Config) -> dict:
  """A plain nested dict, for logging and for storing beside checkpoints."""
  return dataclasses.asdict(config)
