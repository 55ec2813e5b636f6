"""The corpus of a config: its tokenizer, its sources prepared into token stores (once, on first use),
and the train and eval rows cut from them.

Each source's prepared tokens live in `<data_dir>/prepared/<name>-<key>`, the key naming everything they
depend on (the source's settings and files, the tokenizer), so that a changed source or tokenizer is
prepared anew beside the old one and never mixed with it. A trained tokenizer is cached likewise under
`<data_dir>/tokenizers`. Every path may be local or gs://.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile

from absl import logging
from etils import epath

from lm import data, prepare as preparation, sources, token_store, tokenizer as tokenizers
from lm.config import ConfigError, DataConfig, SourceConfig
from lm.tokenizer import Tokenizer


def data_dir(cfg: DataConfig) -> epath.Path:
  if not cfg.data_dir:
    return epath.Path(os.path.expanduser("~/.cache/lm"))
  return epath.Path(cfg.data_dir if "://" in cfg.data_dir else os.path.abspath(os.path.expanduser(cfg.data_dir)))


def _key(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(cfg: DataConfig, vocab_size: int) -> Tokenizer:
  """The configured tokenizer (trained on a sample of the corpus on first use when no path is given),
  checked against the model's vocabulary size."""
  if cfg.tokenizer == "byte":
    tokenizer = tokenizers.ByteTokenizer()
  elif cfg.tokenizer_path:
    tokenizer = tokenizers.read(cfg.tokenizer, os.path.expanduser(cfg.tokenizer_path))
  else:
    tokenizer = _trained_tokenizer(cfg, vocab_size)
  return tokenizers.check(tokenizer, cfg, vocab_size)


def _trained_tokenizer(cfg: DataConfig, vocab_size: int) -> Tokenizer:
  for src in cfg.sources:
    sources.check(src)
  identities = [sources.identity(src) for src in cfg.sources if src.weight > 0]
  path = data_dir(cfg) / "tokenizers" / (
      f"spm_{vocab_size}_{_key(identities, cfg.tokenizer_sample_bytes, vocab_size, 'bpe-v2')}.model")
  if not path.exists():
    logging.info("Training a SentencePiece model of %d pieces on the first %s bytes of the corpus",
                 vocab_size, f"{cfg.tokenizer_sample_bytes:,}")
    model = tokenizers.train_sentencepiece(_sample(cfg), vocab_size)
    try:
      tokenizers.SentencePieceTokenizer(model, os.fspath(path))  # written only once it reads back
    except RuntimeError as e:
      raise ConfigError(f"SentencePiece training gave no usable model ({e}); raise "
                        "config.data.tokenizer_sample_bytes or add text.") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, model)
  return tokenizers.read("sentencepiece", os.fspath(path))


def _sample(cfg: DataConfig):
  """The first train documents of each source (held-out ones skipped), up to its weight's share of
  config.data.tokenizer_sample_bytes."""
  total = sum(src.weight for src in cfg.sources)
  for src in cfg.sources:
    budget = cfg.tokenizer_sample_bytes * src.weight / total
    fraction = 0.0 if src.validation else src.validation_fraction
    for chunk in sources.chunks(src, "train"):
      for text in sources.documents(chunk):
        if text and not (fraction and sources.held_out(text, fraction)):
          yield text
          budget -= len(text.encode("utf-8", errors="replace"))
        if budget <= 0:
          break
      if budget <= 0:
        break


def _write_atomic(path: epath.Path, content: bytes) -> None:
  if "://" in os.fspath(path):
    path.write_bytes(content)  # an object store writes whole objects
    return
  with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
    f.write(content)
  os.chmod(f.name, 0o644)  # a temporary file is private; the data is not
  os.replace(f.name, path)


# ---------------------------------------------------------------------------------------------------
# Prepared sources


@dataclasses.dataclass(frozen=True)
class Prepared:
  """One source's prepared token stores."""
  source: SourceConfig
  directory: str
  manifest: dict
  stores: dict[str, token_store.TokenStore]  # "train", "validation"

  def describe(self) -> str:
    s, train, val = self.source, self.stores["train"], self.stores["validation"]
    held = (f"validation files {s.validation}" if s.validation
            else f"{s.validation_fraction:g} of the documents held out by a hash of their text")
    return (f"{s.kind} {s.path or '(the Python standard library)'}: train {train.num_tokens:,} tokens in "
            f"{train.num_documents:,} documents; {held}: {val.num_tokens:,} tokens in {val.num_documents:,} "
            f"documents ({self.directory})")


def prepared_directory(cfg: DataConfig, src: SourceConfig, tokenizer: Tokenizer) -> tuple[epath.Path, dict]:
  """Where the source's tokens are prepared, and the identity they are prepared from."""
  identity = sources.identity(src)
  return data_dir(cfg) / "prepared" / f"{src.name}-{_key(token_store.FORMAT, identity, tokenizer.fingerprint)}", identity


def prepare_source(cfg: DataConfig, src: SourceConfig, tokenizer: Tokenizer) -> Prepared:
  """The source's stores, prepared first when they are not (or only partly) there."""
  sources.check(src)
  directory, identity = prepared_directory(cfg, src, tokenizer)
  manifest = token_store.read_manifest(os.fspath(directory))
  if manifest is not None:
    _check_manifest(manifest, directory, identity, tokenizer)
  if manifest is None or not manifest["complete"]:
    others = sorted(p.name for p in directory.parent.glob(f"{src.name}-*") if p != directory) \
        if directory.parent.exists() else []
    logging.info("Preparing %s with %s into %s%s", sources.key(src), tokenizer.describe(), directory,
                 f" (other preparations of this source name, for other settings or tokenizers: {others})"
                 if others else "")
    manifest = preparation.prepare(src, tokenizer, os.fspath(directory), identity=identity,
                                   workers=cfg.workers, shard_tokens=cfg.shard_tokens)
  stores = {part: token_store.TokenStore(os.fspath(directory), part, manifest) for part in token_store.PARTS}
  for store in stores.values():
    store.check_files()
  return Prepared(src, os.fspath(directory), manifest, stores)


def _check_manifest(manifest: dict, directory: epath.Path, identity: dict, tokenizer: Tokenizer) -> None:
  if manifest.get("format") != token_store.FORMAT:
    raise ConfigError(f"{directory} holds prepared data of format {manifest.get('format')}, this code reads "
                      f"{token_store.FORMAT}: delete it to prepare again.")
  if manifest["tokenizer"] != tokenizer.fingerprint:
    raise ConfigError(f"{directory} was prepared with tokenizer {manifest['tokenizer']}; the config asks for "
                      f"{tokenizer.describe()} ({tokenizer.fingerprint}). Set config.data.tokenizer and "
                      "tokenizer_path to the tokenizer it was made with, or config.data.data_dir to another "
                      "directory.")
  if json.loads(json.dumps(identity)) != manifest["identity"]:
    raise ConfigError(f"{directory} was prepared from other files or settings than the config names; set "
                      "config.data.data_dir to another directory, or delete it to prepare again.")


def prepare_all(cfg: DataConfig, vocab_size: int) -> tuple[Tokenizer, dict[str, Prepared]]:
  """The tokenizer and every source prepared (`scripts/prepare_data.py`, and main.py on first use)."""
  for src in cfg.sources:  # every source readable before any is tokenized
    sources.check(src)
  tokenizer = load_tokenizer(cfg, vocab_size)
  return tokenizer, {src.name: prepare_source(cfg, src, tokenizer) for src in cfg.sources}


# ---------------------------------------------------------------------------------------------------
# Rows


def _sequences(prepared: Prepared, part: str, seq_len: int) -> data.StoredSequences:
  return data.StoredSequences(prepared.stores[part], seq_len)


def train_batches(prepared: dict[str, Prepared], seq_len: int, seed: int,
                  global_batch_size: int) -> data.TrainBatches:
  weights = {name: p.source.weight for name, p in prepared.items()}
  return data.TrainBatches({name: _sequences(p, "train", seq_len) for name, p in prepared.items()}, seed,
                           global_batch_size, weights)


def eval_batches(cfg: DataConfig, prepared: dict[str, Prepared], seq_len: int, batch_size: int,
                 seed: int) -> data.EvalBatches:
  """The eval rows: the whole validation part of every source, or a seeded sample (config.data)."""
  batches = data.EvalBatches([_sequences(p, cfg.eval_split, seq_len) for p in prepared.values()],
                             cfg.eval_sequences, batch_size, seed)
  if batches.num_sequences == 0:
    tokens = sum(p.stores[cfg.eval_split].num_tokens for p in prepared.values())
    raise ConfigError(f"config.data.eval_split = {cfg.eval_split!r}: its {tokens:,} tokens make no sequence of "
                      f"config.train.seq_len = {seq_len}. Raise the sources' validation_fraction, name "
                      "validation files, or lower train.seq_len.")
  return batches


def describe_eval(cfg: DataConfig, batches: data.EvalBatches) -> str:
  what = "held-out validation" if cfg.eval_split == "validation" else "train"
  return (f"the {what} rows: {batches.describe()} of the sources (config.data.eval_sequences = "
          f"{cfg.eval_sequences}), {len(batches)} batches of {batches.batch_size}")
