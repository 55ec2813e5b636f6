"""Tests for lm/data.py and lm/corpus.py on tiny corpora written into tmp dirs."""

import dataclasses
import os
import random
import shutil
import sysconfig

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from configs import base
from lm import config as config_lib
from lm import corpus as lm_corpus
from lm import data

STDLIB = sysconfig.get_paths()["stdlib"]
CORPUS_MODULES = ("bisect.py", "colorsys.py", "fnmatch.py", "keyword.py", "shlex.py", "textwrap.py",
                  "this.py", "genericpath.py")
VOCAB = 512
SEQ_LEN = 64


def base_data_config(**changes) -> config_lib.DataConfig:
  cfg = config_lib.from_config_dict(base.get_config()).data
  return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A handful of stdlib modules and a data_dir, shared by the tests that only read."""
  root = tmp_path_factory.mktemp("corpus")
  for name in CORPUS_MODULES:
    shutil.copy(os.path.join(STDLIB, name), root / name)
  cfg = base_data_config(text_files=str(root / "*.py"), data_dir=str(root / "data"),
                         validation_fraction=0.25)
  return cfg


@pytest.fixture(scope="module")
def tokenizer(corpus):
  return lm_corpus.load_tokenizer(corpus, VOCAB)


def write_files(directory, contents: dict[str, str]):
  for name, text in contents.items():
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- tokenizers ---------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_ids():
  tok = lm_corpus.load_tokenizer(base_data_config(tokenizer="byte"), 300)
  text = "héllo\n\tworld ✓  "
  ids = tok.encode(text)
  assert tok.pad_id == data.PAD_ID == 0 and (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 259)
  assert min(ids) >= 3 and max(ids) < 259 and len(ids) == len(text.encode("utf-8"))
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, 0, 0]) == text


def test_byte_tokenizer_rejects_small_model_vocab():
  with pytest.raises(config_lib.ConfigError, match="config.model.vocab_size"):
    lm_corpus.load_tokenizer(base_data_config(tokenizer="byte"), 258)


def test_sentencepiece_round_trips_python_source(corpus, tokenizer):
  assert (tokenizer.pad_id, tokenizer.vocab_size) == (0, VOCAB)
  assert str(VOCAB) in tokenizer.describe()
  unseen = "class A:\n\tdef f(self):\n        return  [1,  22,\u00e9 , '✓']  \n\n\n# end\r\n"
  for text in [open(os.path.join(STDLIB, "textwrap.py")).read(), unseen]:
    ids = tokenizer.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges happen: not a byte tokenizer in disguise
    assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id, 0]) == text
  assert tokenizer.encode_batch(["a = 1", "b"]) == [tokenizer.encode("a = 1"), tokenizer.encode("b")]


def test_sentencepiece_model_is_cached(corpus, tokenizer, monkeypatch):
  path = tokenizer.describe().split("(")[1].rstrip(")")
  mtime = os.path.getmtime(path)
  monkeypatch.setattr(lm_corpus, "_train_sentencepiece", lambda *a: pytest.fail("retrained the tokenizer"))
  again = lm_corpus.load_tokenizer(corpus, VOCAB)
  assert again.fingerprint == tokenizer.fingerprint and os.path.getmtime(path) == mtime
  assert not [name for name in os.listdir(os.path.dirname(path)) if name.endswith(".tmp")]


def test_tokenizer_path_errors(corpus, tokenizer, tmp_path):
  with pytest.raises(config_lib.ConfigError, match="config.data.tokenizer_path.*missing.model"):
    lm_corpus.load_tokenizer(dataclasses.replace(corpus, tokenizer_path=str(tmp_path / "missing.model")), VOCAB)
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(config_lib.ConfigError, match="not a SentencePiece model"):
    lm_corpus.load_tokenizer(dataclasses.replace(corpus, tokenizer_path=str(tmp_path / "junk.model")), VOCAB)
  trained = tokenizer.describe().split("(")[1].rstrip(")")
  with pytest.raises(config_lib.ConfigError, match=f"{VOCAB} pieces.*vocab_size = 300; raise"):
    lm_corpus.load_tokenizer(dataclasses.replace(corpus, tokenizer_path=trained), 300)
  assert lm_corpus.load_tokenizer(dataclasses.replace(corpus, tokenizer_path=trained), VOCAB).vocab_size == VOCAB
  # More embedding rows than pieces: an imported model's rows that no text token uses (Gemma3 4B).
  assert lm_corpus.load_tokenizer(dataclasses.replace(corpus, tokenizer_path=trained), 1000).vocab_size == VOCAB


def test_failed_training_leaves_no_file(corpus):
  with pytest.raises(config_lib.ConfigError, match="config.model.vocab_size = 50000.*too high"):
    lm_corpus.load_tokenizer(corpus, 50_000)
  cache = os.path.join(corpus.data_dir, "lm_cache")
  assert not [name for name in os.listdir(cache) if "50000" in name or name.endswith(".tmp")]


def test_tokenizer_path_with_nonzero_pad_is_rejected(tmp_path):
  model = tmp_path / "default_ids"
  text = [open(os.path.join(STDLIB, name)).read() for name in CORPUS_MODULES[:3]]
  spm.SentencePieceTrainer.train(sentence_iterator=iter("\n".join(text).splitlines()), vocab_size=200,
                                 model_prefix=str(model), minloglevel=2)  # default pad_id is -1
  cfg = base_data_config(tokenizer_path=f"{model}.model")
  with pytest.raises(config_lib.ConfigError, match="pad id -1"):
    lm_corpus.load_tokenizer(cfg, 200)


# --- documents and splits --------------------------------------------------------------------------


def documents(cfg, split):
  return list(lm_corpus._documents(cfg, lm_corpus._builder(cfg), split))


def test_splits_are_disjoint_and_cover_the_files(corpus):
  train, validation = documents(corpus, "train"), documents(corpus, "validation")
  originals = sorted(open(os.path.join(STDLIB, name)).read() for name in CORPUS_MODULES)
  assert train and validation and not set(train) & set(validation)
  assert sorted(train + validation) == originals
  assert documents(corpus, "train") == train  # fixed order
  assert len(documents(dataclasses.replace(corpus, max_documents=2), "train")) == 2


def test_validation_assignment_is_stable_and_proportional():
  paths = [f"/corpus/dir{i % 7}/file{i}.py" for i in range(400)]
  chosen = lm_corpus._validation_files(paths, 0.25)
  assert 60 < len(chosen) < 140
  shuffled = random.Random(0).sample(paths, len(paths))
  assert sorted(lm_corpus._validation_files(shuffled, 0.25)) == sorted(chosen)
  # a file's assignment depends only on its own path, not on the others
  assert set(lm_corpus._validation_files(paths[:200], 0.25)) == set(chosen) & set(paths[:200])
  assert len(lm_corpus._validation_files(paths[:3], 0.001)) == 1  # never an empty validation split
  assert len(lm_corpus._validation_files(paths[:3], 0.999)) == 2  # nor an empty train split


def test_changed_files_get_a_new_prepared_dataset(tmp_path):
  write_files(tmp_path / "src", {"a.txt": "alpha " * 50, "sub/b.txt": "beta " * 50})
  cfg = base_data_config(text_files=str(tmp_path / "src" / "**" / "*.txt"), data_dir=str(tmp_path / "d"),
                         tokenizer="byte")
  before = lm_corpus._builder(cfg).info.full_name
  assert lm_corpus._builder(cfg).info.full_name == before
  with open(tmp_path / "src" / "a.txt", "a") as f:
    f.write("gamma")
  assert lm_corpus._builder(cfg).info.full_name != before


def test_local_text_errors(tmp_path):
  cfg = base_data_config(text_files=str(tmp_path / "none" / "*.txt"), data_dir=str(tmp_path / "d"))
  with pytest.raises(config_lib.ConfigError, match="config.data.text_files.*0 file"):
    lm_corpus.load_tokenizer(cfg, VOCAB)
  write_files(tmp_path / "empty", {"a.txt": "", "b.txt": ""})
  cfg = dataclasses.replace(cfg, text_files=str(tmp_path / "empty" / "*.txt"), tokenizer="byte")
  with pytest.raises(config_lib.ConfigError, match="config.data.text_files.*empty"):
    lm_corpus.load_split(cfg, data.ByteTokenizer(), SEQ_LEN, "train")


def test_unknown_tfds_dataset(tmp_path):
  cfg = base_data_config(dataset="no_such_dataset_xyz", data_dir=str(tmp_path), tokenizer="byte")
  with pytest.raises(config_lib.ConfigError, match="config.data.dataset = 'no_such_dataset_xyz'"):
    lm_corpus.load_split(cfg, data.ByteTokenizer(), SEQ_LEN, "train")


def test_unknown_split_and_too_little_text(corpus):
  with pytest.raises(config_lib.ConfigError, match="config.data.eval_split = 'test'"):
    lm_corpus.load_split(dataclasses.replace(corpus, eval_split="test"), data.ByteTokenizer(), SEQ_LEN, "eval")
  with pytest.raises(config_lib.ConfigError, match="fewer than seq_len = 1000000"):
    lm_corpus.load_split(corpus, data.ByteTokenizer(), 1_000_000, "eval")


# --- packing ---------------------------------------------------------------------------------------


def test_pack_small_example():
  stream = np.array([1, 5, 6, 2, 1, 7, 2, 1, 8, 9, 10, 11, 2], np.int32)
  packed = data.pack(stream, bos_id=1, seq_len=4)
  np.testing.assert_array_equal(packed["tokens"], [[1, 5, 6, 2], [1, 7, 2, 1], [8, 9, 10, 11]])
  np.testing.assert_array_equal(packed["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 1]])
  np.testing.assert_array_equal(packed["positions"], [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]])
  assert all(a.dtype == np.int32 for a in packed.values())


def test_load_split_packing_invariants(corpus, tokenizer):
  packed = lm_corpus.load_split(corpus, tokenizer, SEQ_LEN, "train")
  stream = lm_corpus._token_stream(tokenizer, documents(corpus, "train"))
  assert packed.tokens.shape == (len(stream) // SEQ_LEN, SEQ_LEN) == packed.positions.shape
  assert all(a.dtype == np.int32 for a in (packed.tokens, packed.segment_ids, packed.positions))
  non_pad = np.asarray(packed.tokens)[np.asarray(packed.segment_ids) != 0]
  np.testing.assert_array_equal(non_pad, stream[:len(non_pad)])
  # positions restart at 0 exactly where a segment starts: column 0 and at each bos
  starts = np.asarray(packed.positions) == 0
  np.testing.assert_array_equal(starts[:, 1:], np.asarray(packed.tokens)[:, 1:] == tokenizer.bos_id)
  assert starts[:, 0].all()
  steps = np.diff(packed.positions, axis=1)
  np.testing.assert_array_equal(steps == 1, np.diff(packed.segment_ids, axis=1) == 0)
  assert (np.asarray(packed.segment_ids) > 1).any()  # some rows hold several documents


def test_load_split_reads_the_cache(corpus, tokenizer, monkeypatch):
  first = lm_corpus.load_split(corpus, tokenizer, SEQ_LEN, "eval")
  monkeypatch.setattr(lm_corpus, "_token_stream", lambda *a: pytest.fail("re-tokenized a cached split"))
  second = lm_corpus.load_split(corpus, tokenizer, SEQ_LEN, "eval")
  assert isinstance(second.tokens, np.memmap)
  np.testing.assert_array_equal(first.tokens, second.tokens)
  train = lm_corpus.load_split(corpus, tokenizer, SEQ_LEN, "train")
  assert train.tokens.shape != second.tokens.shape or (train.tokens != second.tokens).any()


def test_targets_and_loss_mask_numpy_and_jax():
  tokens = np.array([[1, 5, 6, 1, 7, 0, 0]], np.int32)
  segment_ids = np.array([[1, 1, 1, 2, 2, 0, 0]], np.int32)
  expected_mask = [[True, True, False, True, False, False, False]]
  np.testing.assert_array_equal(data.targets(tokens), [[5, 6, 1, 7, 0, 0, 0]])
  np.testing.assert_array_equal(data.loss_mask(segment_ids), expected_mask)
  np.testing.assert_array_equal(np.asarray(data.targets(jnp.asarray(tokens))), [[5, 6, 1, 7, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(data.loss_mask(jnp.asarray(segment_ids))), expected_mask)
  assert data.loss_mask(segment_ids).dtype == bool


# --- batches ---------------------------------------------------------------------------------------


def synthetic(num_rows: int, seq_len: int = 3) -> data.PackedSequences:
  """Row i holds the value i everywhere, so a batch shows which rows it took."""
  rows = np.repeat(np.arange(num_rows, dtype=np.int32)[:, None], seq_len, axis=1)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), rows.shape)
  return data.PackedSequences(tokens=rows, segment_ids=np.ones_like(rows), positions=positions)


def test_train_batches_are_a_function_of_seed_and_step():
  packed = synthetic(12)
  a, b = data.TrainBatches(packed, seed=3, global_batch_size=4), data.TrainBatches(packed, 3, 4)
  for step in (0, 7, 1000):
    for key in ("tokens", "segment_ids", "positions"):
      np.testing.assert_array_equal(a.get(step)[key], b.get(step)[key])
  np.testing.assert_array_equal(a.get(7)["tokens"][:, 0], a.indices(7))
  other = data.TrainBatches(packed, seed=4, global_batch_size=4)
  first_epoch = lambda batches: np.concatenate([batches.indices(s) for s in range(3)])
  assert (first_epoch(a) != first_epoch(other)).any()


def test_train_batches_row_slices():
  batches = data.TrainBatches(synthetic(20), seed=0, global_batch_size=8)
  full = batches.get(5)
  # Slices, and the scattered positions a process holds when the hosts split an axis other than data.
  for rows in (slice(0, 4), slice(4, 8), slice(2, 3), np.array([0, 1, 4, 5]), np.array([7])):
    part = batches.get(5, rows=rows)
    for key in full:
      np.testing.assert_array_equal(part[key], full[key][rows])
      assert part[key].dtype == np.int32


def test_train_batches_cover_each_epoch_and_reshuffle():
  batches = data.TrainBatches(synthetic(12), seed=0, global_batch_size=4)
  assert batches.steps_per_epoch == 3
  epochs = [np.concatenate([batches.indices(e * 3 + s) for s in range(3)]) for e in range(3)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(12))
  assert (epochs[0] != epochs[1]).any() and (epochs[1] != epochs[2]).any()
  assert (epochs[0] != np.arange(12)).any()


def test_train_batches_span_epochs_when_not_divisible():
  batches = data.TrainBatches(synthetic(10), seed=1, global_batch_size=4)
  assert batches.steps_per_epoch == 2
  stream = np.concatenate([batches.indices(s) for s in range(5)])  # 20 positions = 2 epochs
  np.testing.assert_array_equal(np.sort(stream[:10]), np.arange(10))
  np.testing.assert_array_equal(np.sort(stream[10:]), np.arange(10))


def test_train_batches_larger_than_split():
  with pytest.raises(config_lib.ConfigError, match="5 sequences.*global batch of 8.*micro_batch_size"):
    data.TrainBatches(synthetic(5), seed=0, global_batch_size=8)


def test_eval_batches_padding_and_fixed_content():
  packed = synthetic(7)
  by_size = {size: data.eval_batches(packed, 5, size) for size in (2, 3)}
  assert [len(b) for b in by_size.values()] == [3, 2]
  last = by_size[2][-1]
  assert last["tokens"].shape == (2, 3) and (last["segment_ids"][1] == 0).all()
  assert (last["tokens"][1] == 0).all() and (last["positions"][1] == 0).all()
  real = {size: np.concatenate([b["tokens"][b["segment_ids"].any(axis=1)] for b in batches])
          for size, batches in by_size.items()}
  np.testing.assert_array_equal(real[2], real[3])
  np.testing.assert_array_equal(real[2], packed.tokens[:5])


def test_eval_batches_with_fewer_rows_than_asked():
  batches = data.eval_batches(synthetic(3), 64, 2)
  rows = np.concatenate([b["tokens"][b["segment_ids"].any(axis=1)] for b in batches])
  np.testing.assert_array_equal(rows[:, 0], [0, 1, 2])
  assert len(batches) == 2 and (batches[1]["segment_ids"][1] == 0).all()
