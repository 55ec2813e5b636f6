"""Converts between Hugging Face checkpoints (config.json + safetensors) or llama.cpp GGUF files and this
project's parameters.

  python scripts/convert_hf.py import --hf_dir=Qwen3-1.7B --out=ckpt/qwen3 [--config=configs/qwen3_1_8b.py]
  python scripts/convert_hf.py import --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --out=ckpt/smollm2
  python scripts/convert_hf.py export --checkpoint=runs/qwen3_ft/checkpoints --out=hf/qwen3_ft [--step=N]
  python scripts/convert_hf.py export --checkpoint=runs/smollm2_ft/checkpoints --out=smollm2_ft.gguf --format=gguf \
      [--dtype=float32|bfloat16|q8_0]

import: a LlamaForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM or Gemma3ForConditionalGeneration (its
language model) directory -> parameters that `train.init_from` names (an orbax `params/` and
`model.json`). With --config, the checkpoint must be the config's model: every tensor is checked against
the config's shapes, and config.json's settings against its switches. Without it, the model is read from
config.json and the run settings come from configs/base.py.

import --gguf reads a LLaMA-architecture GGUF file (lm/tools/gguf_file.py): its tensors dequantized to float32
(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; other types are refused, naming them), llama.cpp's q/k row
permutation undone, the model from its `llama.*` metadata, and its tokenizer written as the tokenizer.json,
tokenizer_config.json, chat_template.jinja and generation_config.json that transformers builds from it.

import also copies the tokenizer files of the directory (tokenizer.json, tokenizer_config.json,
tokenizer.model, special_tokens_map.json, generation_config.json, chat_template.jinja: those it has) into
--out, and prints the overrides that fine-tune with them, e.g. for Qwen3

  --config.data.tokenizer=huggingface --config.data.tokenizer_path=ckpt/qwen3/tokenizer.json

(a SentencePiece tokenizer.model alone, as Gemma's: --config.data.tokenizer=sentencepiece
--config.data.tokenizer_path=ckpt/gemma3/tokenizer.model). A directory without them imports with a warning.

export: the parameters of an import, or the newest (or --step) checkpoint of a run's checkpoint directory
-> config.json and model.safetensors (5 GB shards with an index when larger), loadable with
`transformers.AutoModelForCausalLM.from_pretrained`, and the tokenizer files beside them: for a run, those
of the tokenizer its config's data.tokenizer_path names (a tokenizer.json with the tokenizer_config.json,
special_tokens_map.json and generation_config.json of its directory, or a SentencePiece model as
tokenizer.model), when that path exists here; otherwise the tokenizer files in the directory exported (an
import's). A run that trained its own SentencePiece model (data.tokenizer_path empty) exports none.

export --format=gguf: one GGUF file that llama.cpp-based tools serve, LLaMA models only: matrices as --dtype
(q8_0: llama.cpp's 8-bit blocks), norms as float32, q/k rows permuted as llama.cpp expects, and the tokenizer
those same files would carry (a GPT-2 style byte-level BPE tokenizer.json: tokens, merges, special ids,
add_bos/add_eos, the chat template); any other tokenizer is left out with a warning.

Needs numpy, safetensors and gguf, no torch. A problem with the input exits 2 with a message that names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from etils import epath  # noqa: E402
import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import linen as nn  # noqa: E402

from configs import base  # noqa: E402
from lm import storage  # noqa: E402
from lm.checkpoints import checkpoint, param_files  # noqa: E402
from lm.config import MODEL_RUN_SETTINGS, ModelConfig, from_config_dict, same_setting  # noqa: E402
from lm.errors import ConfigError  # noqa: E402
from lm.model import lora  # noqa: E402
from lm.model.decoder import Decoder  # noqa: E402
from lm.tools import gguf_file, hf  # noqa: E402

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# The tokenizer files of a Hugging Face directory. None is a weight file (config.json, model*.safetensors*,
# params/, model.json): copying them never touches the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def load_config_file(path: str):
  """The Config of a configs/*.py file (its get_config())."""
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return from_config_dict(module.get_config())


def abstract_params(cfg: ModelConfig) -> dict:
  """The parameter tree of the model as ShapeDtypeStructs: nothing is allocated."""
  tokens = jax.ShapeDtypeStruct((1, 1), np.int32)
  shapes = jax.eval_shape(lambda t: Decoder(cfg).init(jax.random.key(0), t, t, t), tokens)
  return nn.unbox(shapes["params"])


def check_out(out: str, what: str) -> None:
  """ConfigError when a local --out is (or lies under) a file: it is the directory `what` is written into."""
  if storage.is_remote(out):
    return
  path = existing = os.path.abspath(os.path.expanduser(out))
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = "a file" if existing == path else f"under {existing}, which is a file"
    raise ConfigError(f"--out={out} is {where}, not a directory: name a directory for {what} (created when "
                      "missing; files of the same names in it are replaced).")


def import_hf(hf_dir: str, out: str, config_path: str = "") -> ModelConfig:
  """Hugging Face directory -> parameters under `out`; returns the model they belong to."""
  check_out(out, "the parameters (params/ and model.json)")
  family, hf_config = hf.read_config(hf_dir)
  with open(os.path.join(hf_dir, "config.json")) as f:
    multimodal = "text_config" in json.load(f)
  tensors = hf.language_model_tensors(hf.read_tensors(hf_dir), multimodal)
  cfg = import_tensors(family, hf_config, tensors, out, config_path, hf_dir, "config.json")
  # After the weights: a failed copy leaves a complete import without (some) tokenizer files.
  copied = copy_tokenizer_files({name: epath.Path(hf_dir) / name for name in TOKENIZER_FILES}, out)
  if copied:
    print(f"Copied {', '.join(copied)} from {hf_dir} into {out}.")
  report_tokenizer(hf_dir, out, copied)
  return cfg


def import_gguf(path: str, out: str, config_path: str = "") -> ModelConfig:
  """A LLaMA-architecture GGUF file -> parameters under `out` (dequantized to float32), with its tokenizer
  written as Hugging Face files; returns the model."""
  check_out(out, "the parameters (params/ and model.json)")
  model = gguf_file.read(path)
  cfg = import_tensors("llama", model.config, model.tensors, out, config_path, path, "its GGUF metadata")
  types = ", ".join(f"{n} {name}" for name, n in sorted(model.types.items(), key=lambda kv: -kv[1]))
  print(f"Read {sum(model.types.values())} tensors ({types}) from {path}, dequantized to float32.")
  for name, text in model.tokenizer_files.items():
    (epath.Path(out) / name).write_text(text)
  if model.tokenizer_files:
    print(f"Wrote {', '.join(model.tokenizer_files)} from its metadata into {out}.")
  report_tokenizer(path, out, list(model.tokenizer_files))
  return cfg


def import_tensors(family: str, hf_config: dict, tensors, out: str, config_path: str, source: str,
                   described_by: str) -> ModelConfig:
  """Hugging Face-named tensors and config.json dict -> parameters saved under `out`, checked against
  --config's model when given (`described_by` names where the settings come from, for the messages)."""
  target = load_config_file(config_path).model if config_path else None
  defaults = target or from_config_dict(base.get_config()).model
  described = hf.model_config_from_hf(family, hf_config, defaults)
  # Imported parameters are weights: a LoRA config's adapters are made by its runs, not imported.
  cfg = dataclasses.replace(target or described, lora_rank=0)
  where = f"{source} (for {config_path or described_by})"
  params = hf.from_hf(tensors, cfg, abstract_params(cfg), where)
  if target is not None:
    differences = [f"model.{f.name} = {getattr(target, f.name)!r} in {config_path}, {getattr(described, f.name)!r} "
                   f"in {described_by}" for f in dataclasses.fields(ModelConfig)
                   if f.name not in MODEL_RUN_SETTINGS
                   and not same_setting(getattr(target, f.name), getattr(described, f.name))]
    if differences:
      raise hf.HFError(f"{source}: the tensors fit {config_path}, but {described_by} describes another model: "
                       f"{'; '.join(differences)}.")
  param_files.save_params(out, params, dataclasses.asdict(cfg), source=os.path.abspath(source))
  return cfg


def report_tokenizer(source: str, out: str, written: list[str]) -> None:
  """Prints the overrides that fine-tune with the tokenizer written into `out`, or warns that there is none."""
  if overrides := tokenizer_overrides(out, written):
    print(f"Fine-tune with its tokenizer: {overrides}")
  else:
    print(f"Warning: {source} has no tokenizer (tokenizer.json or tokenizer.model) this converter reads; name "
          "the model's with --config.data.tokenizer and --config.data.tokenizer_path.", file=sys.stderr)


def copy_tokenizer_files(sources: dict[str, epath.Path], out: str) -> list[str]:
  """Copies each source that exists to <out>/<name>, byte for byte (local or gs://); returns the names
  copied. Names are TOKENIZER_FILES only, so no weight file is ever written."""
  copied = []
  for name, source in sources.items():
    if name not in TOKENIZER_FILES:
      raise ValueError(f"{name} is not a tokenizer file")
    target = epath.Path(out) / name
    if not source.is_file():
      continue
    local = not storage.is_remote(source) and not storage.is_remote(target)
    if not (local and target.exists() and os.path.samefile(source, target)):  # exporting into its own dir
      target.write_bytes(source.read_bytes())
    copied.append(name)
  return copied


def tokenizer_overrides(out: str, copied: list[str]) -> str:
  """The flags that name the tokenizer copied into `out`: its tokenizer.json, else its tokenizer.model;
  empty when neither was copied."""
  for kind, name in (("huggingface", "tokenizer.json"), ("sentencepiece", "tokenizer.model")):
    if name in copied:
      return f"--config.data.tokenizer={kind} --config.data.tokenizer_path={epath.Path(out) / name}"
  return ""


def export_hf(path: str, out: str, step: int | None = None, dtype: str = "float32",
              max_shard_bytes: int = hf.MAX_SHARD_BYTES) -> ModelConfig:
  """Parameters (an import, or a run's checkpoints) -> Hugging Face directory `out`."""
  check_out(out, "the Hugging Face files (config.json, model.safetensors, the tokenizer's)")
  if dtype not in EXPORT_DTYPES:
    raise hf.HFError(f"--dtype={dtype} is for --format=gguf; a Hugging Face export is {' or '.join(EXPORT_DTYPES)}.")
  params, cfg = exported_params(path, step)
  config = hf.hf_config(cfg, dtype)
  os.makedirs(out, exist_ok=True)
  hf.write_tensors(out, hf.to_hf(params, cfg, EXPORT_DTYPES[dtype]), max_shard_bytes)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  sources, origin = export_tokenizer_sources(path, step)
  copied = copy_tokenizer_files(sources, out)
  print(f"Copied {', '.join(copied)} ({origin}) to {out}" if copied else
        f"No tokenizer files written to {out}: {origin}.")
  return cfg


def export_gguf(path: str, out: str, step: int | None = None, dtype: str = "float32") -> ModelConfig:
  """Parameters (an import, or a run's checkpoints) -> one llama.cpp GGUF file `out` (LLaMA models), with
  the tokenizer and chat template that a Hugging Face export would carry."""
  if os.path.isdir(out):
    raise ConfigError(f"--out={out} is a directory: a GGUF export is one file; name it, e.g. {out}/model.gguf.")
  params, cfg = exported_params(path, step)
  config = hf.hf_config(cfg, "float32")
  if cfg.name != "llama":
    raise hf.HFError(f"model.name = {cfg.name!r}: GGUF export writes LLaMA models only (llama.cpp's 'llama' "
                     "architecture); export this one as a Hugging Face directory (--format=hf).")
  tensors = hf.to_hf(params, cfg, np.float32)
  sources, origin = export_tokenizer_sources(path, step)
  with tempfile.TemporaryDirectory() as tokenizer_dir:  # the files of one tokenizer, wherever they come from
    copied = copy_tokenizer_files(sources, tokenizer_dir)
    name = os.path.splitext(os.path.basename(out))[0]
    warnings = gguf_file.write(out, config, tensors, dtype, tokenizer_dir, name)
  print(f"Tokenizer: {', '.join(copied)} ({origin})" if copied else f"No tokenizer: {origin}.")
  for warning in warnings:
    print(f"Warning: {warning}", file=sys.stderr)
  return cfg


def exported_params(path: str, step: int | None) -> tuple[dict, ModelConfig]:
  """(numpy parameters, model) of an import or a run's checkpoint; a LoRA run's adapters folded in."""
  params, model = param_files.load_params_on_host(path, step, adapters=True)
  defaults = from_config_dict(base.get_config()).model
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  cfg = dataclasses.replace(defaults, **{k: v for k, v in model.items() if k in known})
  if cfg.lora_rank:  # a LoRA run: its adapters, merged into the weights of the base they adapt
    params = jax.device_get(lora.fold(lora.merge(lora_base(cfg, run_config(path, step)), params), cfg))
    cfg = dataclasses.replace(cfg, lora_rank=0)
  return params, cfg


def lora_base(cfg: ModelConfig, run: dict) -> dict:
  """On the host, the weights a LoRA run adapted: its train.init_from's, else its seed's initialisation."""
  init_from = run["train"]["init_from"]
  if init_from:
    return param_files.load_params_on_host(init_from)[0]
  tokens = np.zeros((1, 1), np.int32)
  cfg = dataclasses.replace(cfg, attention="xla")  # the run's may be a TPU kernel; the parameters are the same
  params = nn.unbox(Decoder(cfg).init(jax.random.key(run["train"]["seed"]), tokens, tokens + 1, tokens)["params"])
  return lora.split(params)[0]


def export_tokenizer_sources(path: str, step: int | None) -> tuple[dict[str, epath.Path], str]:
  """(name in the export -> file, where they come from) of the tokenizer to write beside an export of
  `path`. A run's: the one its config's data.tokenizer_path names, which it trained with; the files in
  `path` only when that path does not exist here. An import's: the files in `path`, which import copied.
  Never files of both: those of two tokenizers would mix."""
  directory = epath.Path(storage.absolute(path))
  beside = {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}
  data = run_config(path, step).get("data")
  if data is None:  # an import's parameters
    return beside, f"from {path}" if beside else f"{path} has none"
  kind, named = data.get("tokenizer", "sentencepiece"), data.get("tokenizer_path", "")
  if kind == "byte" or not named:
    return {}, ("the run used the byte tokenizer, which has no files" if kind == "byte" else
                "the run trained its own SentencePiece model (data.tokenizer_path empty): copy it from its "
                "data.data_dir as tokenizer.model by hand")
  file = epath.Path(named)
  if kind == "huggingface" and file.is_dir():
    file = file / "tokenizer.json"
  if not file.is_file():
    return beside, (f"the run's data.tokenizer_path {named} does not exist here"
                    + (f"; the files in {path} instead" if beside else ""))
  if kind == "sentencepiece":
    return {"tokenizer.model": file}, f"the run's data.tokenizer_path {named}"
  extra = {name: file.parent / name for name in TOKENIZER_FILES if name not in ("tokenizer.json", "tokenizer.model")}
  return {"tokenizer.json": file, **extra}, f"the run's data.tokenizer_path {named} and its directory"


def run_config(path: str, step: int | None) -> dict:
  """The config a run saved with its checkpoint `step` (default the newest) in `path`; {} for an import's
  parameters, which have none."""
  path = storage.absolute(path)
  if (epath.Path(path) / param_files.MODEL_FILE).exists():
    return {}
  manager = checkpoint.reader(path)
  step = manager.latest_step() if step is None else step
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="Hugging Face directory or GGUF file -> parameters for train.init_from")
  source = imp.add_mutually_exclusive_group(required=True)
  source.add_argument("--hf_dir", help="a Hugging Face checkpoint directory")
  source.add_argument("--gguf", help="a llama.cpp GGUF file (LLaMA architecture)")
  imp.add_argument("--out", required=True)
  imp.add_argument("--config", default="", help="configs/*.py whose model the checkpoint must be")
  exp = commands.add_parser("export", help="parameters or a run's checkpoints -> Hugging Face directory or GGUF file")
  exp.add_argument("--checkpoint", required=True, help="an import's --out, or a run's checkpoint directory")
  exp.add_argument("--out", required=True, help="a directory (--format=hf) or a .gguf file (--format=gguf)")
  exp.add_argument("--format", choices=("hf", "gguf"), default="hf")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step; default the newest")
  exp.add_argument("--dtype", choices=sorted(gguf_file.WRITE_TYPES), default="float32",
                   help="q8_0 for --format=gguf only (its matrices; vectors stay float32)")
  exp.add_argument("--max_shard_bytes", type=int, default=hf.MAX_SHARD_BYTES,
                   help="larger checkpoints are split into files of at most this size, with an index")
  args = parser.parse_args(argv)
  try:
    if args.command == "import":
      source = args.hf_dir or args.gguf
      start = time.perf_counter()
      cfg = (import_hf if args.hf_dir else import_gguf)(source, args.out, args.config)
      print(f"Imported {cfg.name} ({cfg.num_layers} layers, d_model {cfg.d_model}) from {source} into "
            f"{args.out} in {time.perf_counter() - start:.1f} s; train from it with "
            f"--config.train.init_from={args.out}")
    elif args.format == "gguf":
      cfg = export_gguf(args.checkpoint, args.out, args.step, args.dtype)
      print(f"Exported {cfg.name} as GGUF ({args.dtype}) to {args.out}")
    else:
      cfg = export_hf(args.checkpoint, args.out, args.step, args.dtype, args.max_shard_bytes)
      print(f"Exported {cfg.name} as {hf.ARCHITECTURES[cfg.name]} ({args.dtype}) to {args.out}")
  except (hf.HFError, ConfigError) as e:
    print(f"Conversion error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
