"""The corpus: documents from TFDS or local text files, the trained tokenizer, and the packed splits,
each cached on disk.

Every derived artifact (prepared dataset, trained tokenizer, packed arrays) is cached on disk under a key
that names everything it depends on, and written atomically, so a rerun starts instantly and a killed
run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import itertools
import os
import shutil
import sysconfig
import tempfile
from typing import Iterable, Iterator

from absl import logging
import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds

from lm.config import ConfigError, DataConfig
from lm.data import (ARRAYS, PAD_ID, ByteTokenizer, PackedSequences, SentencePieceTokenizer, Tokenizer,
                     pack)

_ENCODE_CHUNK = 512  # documents per batched encode call


# ---------------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizer(cfg: DataConfig, vocab_size: int) -> Tokenizer:
  """The configured tokenizer, checked against the model's vocabulary size."""
  if cfg.tokenizer == "byte":
    if vocab_size < ByteTokenizer.vocab_size:
      raise ConfigError(f"config.model.vocab_size = {vocab_size} is below the 259 ids of the byte "
                        "tokenizer; raise it to at least 259.")
    return ByteTokenizer()
  path = os.path.expanduser(cfg.tokenizer_path) if cfg.tokenizer_path else _trained_tokenizer(cfg, vocab_size)
  tokenizer = _read_sentencepiece(path)
  # Fewer pieces than rows is allowed: imported models may have rows no text token uses (Gemma3 4B's
  # image tokens).
  if tokenizer.vocab_size > vocab_size:
    raise ConfigError(f"config.data.tokenizer_path = {path!r} has {tokenizer.vocab_size} pieces but "
                      f"config.model.vocab_size = {vocab_size}; raise model.vocab_size to at least "
                      f"{tokenizer.vocab_size}.")
  if tokenizer.pad_id != PAD_ID:
    raise ConfigError(f"config.data.tokenizer_path = {path!r} has pad id {tokenizer.pad_id}; the model "
                      f"masks padding by id {PAD_ID}. Train it with pad_id=0 (e.g. pad_id=0 unk_id=1 "
                      "bos_id=2 eos_id=3), or leave tokenizer_path empty to train one.")
  # Packing finds documents by their bos and frames them with eos: both must be real, distinct ids.
  if not (0 < tokenizer.bos_id < vocab_size and 0 < tokenizer.eos_id < vocab_size
          and tokenizer.bos_id != tokenizer.eos_id):
    raise ConfigError(f"config.data.tokenizer_path = {path!r} has bos id {tokenizer.bos_id} and eos id "
                      f"{tokenizer.eos_id}; packing needs both, distinct and not the pad id 0. Train it "
                      "with bos_id=2 eos_id=3, or leave tokenizer_path empty to train one.")
  return tokenizer


def _read_sentencepiece(path: str) -> SentencePieceTokenizer:
  try:
    with open(path, "rb") as f:
      proto = f.read()
    return SentencePieceTokenizer(proto, path)
  except OSError as e:
    raise ConfigError(f"config.data.tokenizer_path = {path!r} cannot be read ({e}); point it at a "
                      "SentencePiece .model file, or leave it empty to train one.") from e
  except RuntimeError as e:  # SentencePiece's parse failure
    raise ConfigError(f"config.data.tokenizer_path = {path!r} is not a SentencePiece model ({e}).") from e


def _trained_tokenizer(cfg: DataConfig, vocab_size: int) -> str:
  """Path of a SentencePiece model trained on the train split, training it on first use."""
  builder = _builder(cfg)
  key = _key(builder.info.full_name, cfg.text_feature, cfg.train_split, cfg.max_documents, vocab_size,
             "bpe-v1")
  path = os.path.join(_cache_dir(cfg), f"spm_{vocab_size}_{key}.model")
  if os.path.exists(path):
    return path
  logging.info("Training a SentencePiece model of %d pieces on %s", vocab_size, builder.info.full_name)
  lines = (line for doc in _documents(cfg, builder, cfg.train_split) for line in doc.splitlines() if line)
  try:
    with _atomic_file(path) as f:
      _train_sentencepiece(lines, f, vocab_size)
  except RuntimeError as e:  # e.g. "Vocabulary size too high": the corpus has too few distinct pieces
    raise ConfigError(f"config.model.vocab_size = {vocab_size}: SentencePiece cannot train on "
                      f"{builder.info.full_name} ({e}); lower the vocab size or add text.") from e
  return path


def _train_sentencepiece(lines: Iterator[str], model_file, vocab_size: int) -> None:
  # The sentence sample is random: a fixed seed gives every host and every rerun the same tokenizer.
  spm.set_random_generator_seed(0)
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines, model_writer=model_file, model_type="bpe", vocab_size=vocab_size,
      pad_id=PAD_ID, unk_id=1, bos_id=2, eos_id=3, byte_fallback=True, split_digits=True,
      # Keep every space exactly as written so Python indentation round-trips. The corpus is fed line by
      # line, so a dummy prefix would teach pieces that never occur mid-document.
      allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, add_dummy_prefix=False,
      normalization_rule_name="identity", input_sentence_size=2_000_000, shuffle_input_sentence=True,
      num_threads=os.cpu_count() or 1, minloglevel=2)


# ---------------------------------------------------------------------------------------------------
# Documents


@dataclasses.dataclass
class LocalTextConfig(tfds.core.BuilderConfig):
  """A set of files and their train/validation assignment; the name hashes both."""

  # Out of the repr: TFDS logs the config, and the standard library is thousands of paths.
  files: tuple[str, ...] = dataclasses.field(default=(), repr=False)
  validation: tuple[str, ...] = dataclasses.field(default=(), repr=False)


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Local text files, one document per file."""

  VERSION = tfds.core.Version("1.0.0")
  _known_configs: dict[str, LocalTextConfig] = {}  # file sets of this process, by name

  @classmethod
  def get_builder_config(cls, name, version=None):
    # Configurations are made at run time from the file list; knowing them keeps TFDS from warning
    # "Using custom data configuration" about every one.
    return cls._known_configs.get(name)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    validation = set(self.builder_config.validation)
    train = [path for path in self.builder_config.files if path not in validation]
    return {"train": self._generate_examples(train),
            "validation": self._generate_examples(sorted(validation))}

  def _generate_examples(self, paths):
    for path in paths:
      with open(path, encoding="utf-8", errors="replace") as f:
        yield path, {"text": f.read()}


def _text_files(cfg: DataConfig) -> list[str]:
  if cfg.text_files:
    patterns = [os.path.expanduser(p.strip()) for p in cfg.text_files.split(",") if p.strip()]
  else:
    patterns = [os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")]
  found = {os.path.abspath(p) for pattern in patterns for p in glob.glob(pattern, recursive=True)}
  # Third-party packages are not the standard library, and would make the corpus depend on the venv.
  excluded = {"site-packages", "dist-packages"}
  return sorted(p for p in found if os.path.isfile(p) and not excluded & set(p.split(os.sep)))


def _validation_files(files: list[str], fraction: float) -> list[str]:
  """About `fraction` of the files, chosen by a hash of the path: stable as files come and go."""
  score = {p: int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") / 2.0**64 for p in files}
  by_score = sorted(files, key=score.get)
  chosen = [p for p in by_score if score[p] < fraction]
  return by_score[:max(1, min(len(chosen), len(files) - 1))]


def _local_text_builder(cfg: DataConfig, data_dir: str) -> LocalText:
  files = _text_files(cfg)
  what = f"config.data.text_files = {cfg.text_files!r}"
  if len(files) < 2:
    raise ConfigError(f"{what} matches {len(files)} file(s); local_text needs at least two (one for "
                      "validation). Fix the comma-separated globs.")
  stats = [os.stat(p) for p in files]
  if all(s.st_size == 0 for s in stats):
    raise ConfigError(f"{what} matches only empty files: the corpus is empty.")
  validation = _validation_files(files, cfg.validation_fraction)
  identity = [(p, s.st_size, s.st_mtime_ns) for p, s in zip(files, stats)] + [cfg.validation_fraction]
  return _prepared_local_text(_key(*identity), tuple(files), tuple(validation), data_dir)


@functools.lru_cache(maxsize=8)
def _prepared_local_text(name: str, files: tuple[str, ...], validation: tuple[str, ...],
                         data_dir: str) -> LocalText:
  """Made once per file set: TFDS warns about a custom configuration each time a builder is made."""
  config = LocalTextConfig(name=name, version="1.0.0", files=files, validation=validation,
                           description=f"{len(files)} files, {len(validation)} for validation")
  LocalText._known_configs[name] = config
  builder = LocalText(config=config, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def _builder(cfg: DataConfig) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of the configured dataset."""
  data_dir = _data_dir(cfg)
  if cfg.dataset == "local_text":
    return _local_text_builder(cfg, data_dir)
  try:
    builder = tfds.builder(cfg.dataset, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise ConfigError(f"config.data.dataset = {cfg.dataset!r} is not a registered TFDS dataset; use "
                      "local_text or a name from https://www.tensorflow.org/datasets/catalog.") from e
  builder.download_and_prepare()
  if cfg.text_feature not in builder.info.features:
    raise ConfigError(f"config.data.text_feature = {cfg.text_feature!r} is not a feature of {cfg.dataset}; "
                      f"it has {sorted(builder.info.features.keys())}.")
  return builder


def _documents(cfg: DataConfig, builder: tfds.core.DatasetBuilder, split: str) -> Iterator[str]:
  """The split's documents in the dataset's fixed order, at most cfg.max_documents of them."""
  feature = "text" if cfg.dataset == "local_text" else cfg.text_feature
  ds = builder.as_dataset(split=split, shuffle_files=False).map(lambda example: example[feature])
  if cfg.max_documents > 0:
    ds = ds.take(cfg.max_documents)
  for text in tfds.as_numpy(ds):
    yield text.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------
# Packed splits


def _split(cfg: DataConfig, builder: tfds.core.DatasetBuilder, split: str) -> tuple[str, str]:
  """(config key, TFDS split name) of the `train` or `eval` split, checked to exist."""
  key_name, split_name = {"train": ("train_split", cfg.train_split),
                          "eval": ("eval_split", cfg.eval_split)}[split]
  if split_name.partition("[")[0] not in builder.info.splits:
    raise ConfigError(f"config.data.{key_name} = {split_name!r} is not a split of {cfg.dataset}; it has "
                      f"{sorted(builder.info.splits.keys())}.")
  return key_name, split_name


def check_splits(cfg: DataConfig) -> None:
  """Fails at startup, before any tokenizing, when the train or eval split does not exist."""
  builder = _builder(cfg)
  for split in ("train", "eval"):
    _split(cfg, builder, split)


def load_split(cfg: DataConfig, tokenizer: Tokenizer, seq_len: int, split: str) -> PackedSequences:
  """The packed `train` or `eval` split, from the cache when it has been packed before."""
  builder = _builder(cfg)
  key_name, split_name = _split(cfg, builder, split)
  key = _key(builder.info.full_name, cfg.text_feature, split_name, cfg.max_documents, tokenizer.fingerprint,
             seq_len)
  directory = os.path.join(_cache_dir(cfg), f"packed_{split}_{seq_len}_{key}")
  if not os.path.isdir(directory):
    logging.info("Tokenizing and packing %s split %r with %s", cfg.dataset, split_name, tokenizer.describe())
    tokens = _token_stream(tokenizer, _documents(cfg, builder, split_name))
    _write_arrays(directory, pack(tokens, tokenizer.bos_id, seq_len))
  data = PackedSequences(**{name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
                            for name in ARRAYS})
  if len(data) == 0:
    raise ConfigError(f"config.data.dataset = {cfg.dataset!r}, config.data.{key_name} = {split_name!r}: "
                      f"the corpus has fewer than seq_len = {seq_len} tokens; lower config.train.seq_len "
                      "or add text.")
  return data


def _token_stream(tokenizer: Tokenizer, documents: Iterable[str]) -> np.ndarray:
  """All documents as one int32 stream, each one [bos] + text + [eos]."""
  framed = [np.array([tokenizer.bos_id, *ids, tokenizer.eos_id], np.int32)
            for chunk in itertools.batched(documents, _ENCODE_CHUNK)
            for ids in tokenizer.encode_batch(list(chunk))]
  return np.concatenate(framed) if framed else np.zeros([0], np.int32)



# ---------------------------------------------------------------------------------------------------
# Cache


def _data_dir(cfg: DataConfig) -> str:
  return os.path.expanduser(cfg.data_dir) if cfg.data_dir else tfds.core.constants.DATA_DIR


def _cache_dir(cfg: DataConfig) -> str:
  path = os.path.join(_data_dir(cfg), "lm_cache")
  os.makedirs(path, exist_ok=True)
  return path


def _key(*parts) -> str:
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _atomic_file(path: str):
  """A binary file that appears at `path` only once fully written."""
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".tmp", delete=False) as f:
    try:
      yield f
    except BaseException:
      f.close()
      os.remove(f.name)
      raise
  os.replace(f.name, path)


def _write_arrays(directory: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes the arrays as .npy files into a temporary directory, then renames it into place."""
  tmp = tempfile.mkdtemp(dir=os.path.dirname(directory), suffix=".tmp")
  for name, array in arrays.items():
    np.save(os.path.join(tmp, f"{name}.npy"), array, allow_pickle=False)
  try:
    os.rename(tmp, directory)
  except OSError:  # another process finished the same arrays first; they are identical
    shutil.rmtree(tmp)


def load(cfg: DataConfig, vocab_size: int, seq_len: int,
         splits: tuple[str, ...]) -> tuple[Tokenizer, dict[str, PackedSequences]]:
  """The tokenizer and the packed `splits` ("train", "eval"), after checking that both splits exist
  (before any tokenizing)."""
  check_splits(cfg)
  tokenizer = load_tokenizer(cfg, vocab_size)
  return tokenizer, {split: load_split(cfg, tokenizer, seq_len, split) for split in splits}
