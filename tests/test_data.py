"""Tests for lm/data/tokenizer.py, lm/data/sources.py, lm/data/prepare.py, lm/data/corpus.py and lm/data/batching.py on tiny corpora
written into tmp dirs."""

import dataclasses
import gzip
import json
import os
import pickle
import shutil
import socket
import subprocess
import sysconfig
import threading
import time

import numpy as np
import pytest
import sentencepiece as spm

from configs import base
from lm import config as config_lib
from lm.data import batching, corpus as lm_corpus, prepare, sources, token_store, tokenizer as tokenizers
from lm.errors import ConfigError

STDLIB = sysconfig.get_paths()["stdlib"]
CORPUS_MODULES = ("bisect.py", "colorsys.py", "fnmatch.py", "keyword.py", "shlex.py", "textwrap.py",
                  "this.py", "genericpath.py")
VOCAB = 512
SEQ_LEN = 64


def data_config(**changes) -> config_lib.DataConfig:
  """The base data section with `changes`; source keys go to the one source, `main`."""
  c = base.get_config()
  source_keys = set(c.data.sources.main.keys())
  for key, value in changes.items():
    (c.data.sources.main if key in source_keys else c.data)[key] = value
  return config_lib.from_config_dict(c).data


def source_of(cfg):
  return cfg.sources[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A handful of stdlib modules and a data_dir, shared by the tests that only read."""
  root = tmp_path_factory.mktemp("corpus")
  for name in CORPUS_MODULES:
    shutil.copy(os.path.join(STDLIB, name), root / name)
  return data_config(path=str(root / "*.py"), validation=str(root / "this.py"), data_dir=str(root / "data"))


@pytest.fixture(scope="module")
def tokenizer(corpus):
  return lm_corpus.load_tokenizer(corpus, VOCAB)


def write_files(directory, contents: dict[str, str]):
  for name, text in contents.items():
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def texts_of(src, part="train"):
  return [t for chunk in sources.chunks(src, part) for _, t in sources.documents(chunk)]


# --- tokenizers ---------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_ids():
  tok = lm_corpus.load_tokenizer(data_config(tokenizer="byte"), 300)
  text = "héllo\n\tworld ✓  "
  ids = tok.encode(text)
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 259)
  assert min(ids) >= 3 and max(ids) < 259 and len(ids) == len(text.encode("utf-8"))
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, 0, 0]) == text
  assert tokenizers.frame(tok, [text]) == [[1, *ids, 2]]


def test_byte_tokenizer_rejects_small_model_vocab():
  with pytest.raises(ConfigError, match="259 ids but config.model.vocab_size = 258"):
    lm_corpus.load_tokenizer(data_config(tokenizer="byte"), 258)


def test_trained_sentencepiece_round_trips_python_source(corpus, tokenizer):
  assert tokenizer.vocab_size == VOCAB and (tokenizer.bos_id, tokenizer.eos_id) == (2, 3)
  unseen = "class A:\n\tdef f(self):\n        return  [1,  22,\u00e9 , '✓']  \n\n\n# end\r\n"
  for text in [open(os.path.join(STDLIB, "textwrap.py")).read(), unseen]:
    ids = tokenizer.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges happen: not a byte tokenizer in disguise
    assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id, 0]) == text
  assert tokenizer.encode_batch(["a = 1", "b"]) == [tokenizer.encode("a = 1"), tokenizer.encode("b")]
  assert pickle.loads(pickle.dumps(tokenizer)).encode(unseen) == tokenizer.encode(unseen)  # for workers


def test_trained_sentencepiece_is_cached_and_learns_from_a_bounded_sample(corpus, tokenizer, monkeypatch):
  monkeypatch.setattr(tokenizers, "train_sentencepiece", lambda *a: pytest.fail("retrained the tokenizer"))
  assert lm_corpus.load_tokenizer(corpus, VOCAB).fingerprint == tokenizer.fingerprint
  learned = []
  monkeypatch.setattr(tokenizers, "train_sentencepiece", lambda texts, vocab: learned.extend(texts) or b"")
  with pytest.raises(ConfigError):  # b"" is no model; what matters is what it was given
    lm_corpus.load_tokenizer(dataclasses.replace(corpus, tokenizer_sample_bytes=5000), VOCAB)
  assert 0 < sum(len(t) for t in learned) < 5000 + max(map(len, texts_of(source_of(corpus))))
  assert open(os.path.join(STDLIB, "this.py")).read() not in learned  # validation is not learned from


def test_failed_training_leaves_no_file(corpus):
  with pytest.raises(ConfigError, match=r"^config.model.vocab_size = 50000: SentencePiece can learn at most "
                                        r"([\d,]+) pieces from the [\d,]+ bytes of text sampled from the corpus, "
                                        r"too little text for 50,000 pieces: lower config.model.vocab_size to \d+ "
                                        r"or less, or add text") as e:
    lm_corpus.load_tokenizer(corpus, 50_000)
  assert "ncrease" not in str(e.value)  # SentencePiece's own advice names its flags, and contradicted ours
  assert not [p for p in os.listdir(os.path.join(corpus.data_dir, "tokenizers")) if "50000" in p or ".tmp" in p]


def test_a_vocabulary_too_small_for_the_characters_says_to_raise_it(corpus):
  with pytest.raises(ConfigError, match=r"^config.model.vocab_size = 300 is too small for the [\d,]+ bytes of "
                                        r"text sampled from the corpus: a SentencePiece model of it needs at least "
                                        r"(\d+) pieces .* Raise config.model.vocab_size to at least \1\.$") as e:
    lm_corpus.load_tokenizer(corpus, 300)
  assert "lower" not in str(e.value) and 300 < int(e.value.args[0].split("at least ")[1].split()[0]) < 512


def test_a_damaged_cached_tokenizer_is_named_with_the_fix(corpus, tokenizer, tmp_path):
  shutil.copytree(os.path.join(corpus.data_dir, "tokenizers"), tmp_path / "tokenizers")
  (cached,) = [p for p in (tmp_path / "tokenizers").iterdir() if p.name.startswith(f"spm_{VOCAB}_")]
  cached.write_bytes(cached.read_bytes()[:100])
  with pytest.raises(ConfigError, match=rf"^The SentencePiece tokenizer cached in {cached} by an earlier run "
                                        r"\(trained on this corpus; config.data.tokenizer_path is empty\) is damaged "
                                        r"\(RuntimeError: .*\)\. Delete that file: the next run trains it again"):
    lm_corpus.load_tokenizer(dataclasses.replace(corpus, data_dir=str(tmp_path)), VOCAB)


def test_tokenizer_path_errors(corpus, tokenizer, tmp_path):
  with pytest.raises(ConfigError, match="config.data.tokenizer_path.*missing.model.*cannot be read"):
    lm_corpus.load_tokenizer(dataclasses.replace(corpus, tokenizer_path=str(tmp_path / "missing.model")), VOCAB)
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(ConfigError, match="not a SentencePiece model.*tokenizer=huggingface"):
    lm_corpus.load_tokenizer(dataclasses.replace(corpus, tokenizer_path=str(tmp_path / "junk.model")), VOCAB)
  with pytest.raises(ConfigError, match="not a Hugging Face tokenizer.json"):
    lm_corpus.load_tokenizer(dataclasses.replace(corpus, tokenizer="huggingface",
                                                 tokenizer_path=str(tmp_path / "junk.model")), VOCAB)
  trained = tokenizer.describe().split("(")[1].rstrip(")")
  with pytest.raises(ConfigError, match=f"{VOCAB} ids but config.model.vocab_size = 300; raise"):
    lm_corpus.load_tokenizer(dataclasses.replace(corpus, tokenizer_path=trained), 300)
  # More embedding rows than ids: an imported model's rows that no text token uses (Gemma3 4B).
  assert lm_corpus.load_tokenizer(dataclasses.replace(corpus, tokenizer_path=trained), 1000).vocab_size == VOCAB


def _sentencepiece(tmp_path, **ids) -> str:
  text = [open(os.path.join(STDLIB, name)).read() for name in CORPUS_MODULES[:3]]
  prefix = tmp_path / "spm"
  spm.SentencePieceTrainer.train(sentence_iterator=iter("\n".join(text).splitlines()), vocab_size=200,
                                 model_prefix=str(prefix), minloglevel=2, **ids)
  return f"{prefix}.model"


def test_pretrained_sentencepiece_with_any_special_ids(tmp_path):
  # SentencePiece's defaults, LLaMA-2's: unk 0, bos 1, eos 2, no pad (-1).
  llama = lm_corpus.load_tokenizer(data_config(tokenizer_path=_sentencepiece(tmp_path)), 200)
  assert (llama.bos_id, llama.eos_id) == (1, 2)
  assert tokenizers.frame(llama, ["a b"]) == [[1, *llama.encode("a b"), 2]]
  no_bos = lm_corpus.load_tokenizer(data_config(tokenizer_path=_sentencepiece(tmp_path, bos_id=-1)), 200)
  assert no_bos.bos_id is None and tokenizers.frame(no_bos, ["a b"]) == [[*no_bos.encode("a b"), no_bos.eos_id]]


def _hf_tokenizer(directory, config: dict | None, post_processor=None) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|endoftext|>", "<s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([open(os.path.join(STDLIB, n)).read() for n in CORPUS_MODULES], trainer)
  tok.decoder = decoders.ByteLevel()
  if post_processor is not None:
    tok.post_processor = post_processor
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  if config is not None:
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return str(directory / "tokenizer.json")


def test_hugging_face_tokenizer_json(tmp_path):
  from tokenizers import processors

  qwen_like = _hf_tokenizer(tmp_path / "qwen", {"bos_token": None, "eos_token": "<|endoftext|>"})
  tok = lm_corpus.load_tokenizer(data_config(tokenizer="huggingface", tokenizer_path=qwen_like), 512)
  eos = json.load(open(qwen_like))["added_tokens"][1]
  assert tok.eos_id == eos["id"] and eos["content"] == "<|endoftext|>"
  text = "def f(x):\n    return x  # ✓\n"
  assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) < len(text)
  assert tokenizers.frame(tok, [text]) == [[*tok.encode(text), tok.eos_id]] and tokenizers.encode_input(tok, text) == tok.encode(text)
  assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)
  assert tok.decode([*tok.encode("a"), tok.eos_id], special=True) == "a<|endoftext|>"
  # A bos_token in tokenizer_config.json alone adds nothing (SmolLM2 names <|im_start|>; transformers adds
  # nothing): only the post-processor frames an input (LLaMA 3's adds <|begin_of_text|>).
  smol_like = _hf_tokenizer(tmp_path / "smol", {"bos_token": {"content": "<s>"}, "eos_token": "<|endoftext|>"})
  tok = lm_corpus.load_tokenizer(data_config(tokenizer="huggingface", tokenizer_path=str(tmp_path / "smol")), 512)
  assert tokenizers.frame(tok, ["x"]) == [[*tok.encode("x"), 1]] and smol_like.endswith("tokenizer.json")
  bos = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 2)])
  _hf_tokenizer(tmp_path / "llama", {"bos_token": "<s>", "eos_token": "<|endoftext|>"}, bos)
  tok = lm_corpus.load_tokenizer(data_config(tokenizer="huggingface", tokenizer_path=str(tmp_path / "llama")), 512)
  assert tokenizers.frame(tok, ["x"]) == [[2, *tok.encode("x"), 1]] and tokenizers.encode_input(tok, "x")[0] == 2
  assert "input framing <s>, separator <|endoftext|>" in tok.describe()
  # Without tokenizer_config.json: the end-of-text token it has.
  bare = _hf_tokenizer(tmp_path / "bare", None)
  tok = lm_corpus.load_tokenizer(data_config(tokenizer="huggingface", tokenizer_path=bare), 512)
  assert tok.eos_id == 1
  with pytest.raises(ConfigError, match="400 ids but config.model.vocab_size = 256"):
    lm_corpus.load_tokenizer(data_config(tokenizer="huggingface", tokenizer_path=bare), 256)
  with pytest.raises(ConfigError, match="tokenizer = 'huggingface' needs config.data.tokenizer_path"):
    data_config(tokenizer="huggingface")


# --- sources ---------------------------------------------------------------------------------------


def test_explicit_validation_files_are_never_trained_on(tmp_path):
  write_files(tmp_path, {"train.txt": "the train text", "val.txt": "the validation text"})
  src = source_of(data_config(path=str(tmp_path / "*.txt"), validation=str(tmp_path / "val.txt")))
  assert texts_of(src) == ["the train text"] and texts_of(src, "validation") == ["the validation text"]


def test_held_out_documents_are_a_stable_fraction():
  texts = [f"document {i}" for i in range(4000)]
  chosen = {t for t in texts if sources.held_out(t, 0.1)}
  assert 340 < len(chosen) < 460
  assert {t for t in texts if sources.held_out(t, 0.1)} == chosen  # a function of the text alone
  assert chosen < {t for t in texts if sources.held_out(t, 0.3)}  # more held out: a superset


def test_jsonl_parquet_and_text_sources(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard

  docs = [f"doc {i}: " + "word " * (i % 7) for i in range(40)]
  lines = "".join(json.dumps({"id": i, "content": d}) + "\n" for i, d in enumerate(docs)).encode()
  (tmp_path / "a.jsonl").write_bytes(lines[:len(lines) // 2 + lines[len(lines) // 2:].index(b"\n") + 1])
  rest = lines[len(lines) // 2 + lines[len(lines) // 2:].index(b"\n") + 1:]
  (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(rest))
  (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
  for path, expected in ((f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl.gz", docs), (f"{tmp_path}/*.zst", docs)):
    src = source_of(data_config(kind="jsonl", path=path, text_field="content"))
    assert texts_of(src) == expected
  assert len(texts_of(source_of(data_config(kind="jsonl", path=f"{tmp_path}/*.zst", text_field="content",
                                            max_documents=7)))) == 7
  with pytest.raises(ConfigError, match=r"sources.main.text_field = 'text': a record of .*a.jsonl has no such "
                                        r"field; it has \['content', 'id'\]"):
    texts_of(source_of(data_config(kind="jsonl", path=f"{tmp_path}/a.jsonl")))
  pq.write_table(pa.table({"text": docs, "n": list(range(40))}), tmp_path / "d.parquet", row_group_size=16)
  assert texts_of(source_of(data_config(kind="parquet", path=f"{tmp_path}/d.parquet"))) == docs
  with pytest.raises(ConfigError, match=r"text_field = 'body' is not a column of .*d.parquet; it has \['text', 'n'\]"):
    texts_of(source_of(data_config(kind="parquet", path=f"{tmp_path}/d.parquet", text_field="body")))
  (tmp_path / "big.txt").write_text("first\nstill first\n\n\n  \nsecond\n\nthird<END>fourth")
  assert texts_of(source_of(data_config(kind="text", path=f"{tmp_path}/big.txt"))) == [
      "first\nstill first", "second", "third<END>fourth"]
  assert texts_of(source_of(data_config(kind="text", path=f"{tmp_path}/big.txt", separator="<END>"))) == [
      "first\nstill first\n\n\n  \nsecond\n\nthird", "fourth"]


def test_source_errors(tmp_path):
  with pytest.raises(ConfigError, match=r"config.data.sources.main.path = .*matches no file"):
    sources.check(source_of(data_config(path=str(tmp_path / "none" / "*.txt"))))
  write_files(tmp_path / "empty", {"a.txt": "", "b.txt": ""})
  with pytest.raises(ConfigError, match="config.data.sources.main: the train files .2. are all empty"):
    sources.check(source_of(data_config(path=str(tmp_path / "empty" / "*.txt"))))
  with pytest.raises(ConfigError, match="config.data.sources.main.path is empty"):
    data_config(kind="jsonl")
  (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:40])
  with pytest.raises(ConfigError, match=r"sources.main: cannot read .*cut.jsonl.gz \((EOFError|BadGzipFile)"):
    texts_of(source_of(data_config(kind="jsonl", path=str(tmp_path / "cut.jsonl.gz"))))
  (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
  with pytest.raises(ConfigError, match=r"cannot read .*junk.parquet .*Fix or remove the file"):
    texts_of(source_of(data_config(kind="parquet", path=str(tmp_path / "junk.parquet"))))
  with pytest.raises(ConfigError, match="config.data.sources.main.path = 'no_such_dataset_xyz' is not a registered"):
    sources.check(source_of(data_config(kind="tfds", path="no_such_dataset_xyz")))


@pytest.fixture(scope="module")
def tfds_data_dir(tmp_path_factory):
  """TFDS's data dir for these tests, holding the datasets of tests/tfds_datasets.py once prepared."""
  from tensorflow_datasets.core import constants
  import tests.tfds_datasets  # noqa: F401  (registers them)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(constants, "DATA_DIR", str(tmp_path_factory.mktemp("tfds")))
    yield constants.DATA_DIR


def test_tfds_splits_that_select_nothing_and_datasets_that_cannot_download(tfds_data_dir):
  src = source_of(data_config(kind="tfds", path="lm_test_text", validation="validation"))
  sources.check(src)
  assert len(texts_of(src)) == 20  # in TFDS's order of the examples
  assert sorted(texts_of(src, "validation")) == [f"validation document {i}: " + "word " * i for i in range(5)]
  with pytest.raises(ConfigError, match=r"^config.data.sources.main.train_split = 'train\[:0%\]' selects no example "
                                        r"of lm_test_text \(its 'train' split has 20\); widen the slice"):
    sources.check(source_of(data_config(kind="tfds", path="lm_test_text", train_split="train[:0%]")))
  with pytest.raises(ConfigError, match=r"validation = 'validation\[5:\]' selects no example of lm_test_text "
                                        r"\(its 'validation' split has 5\)"):
    sources.check(source_of(data_config(kind="tfds", path="lm_test_text", validation="validation[5:]")))
  with pytest.raises(ConfigError, match=r"train_split = 'train\[x\]' is not a TFDS split \(Error parsing split"):
    sources.check(source_of(data_config(kind="tfds", path="lm_test_text", train_split="train[x]")))
  with pytest.raises(ConfigError, match=r"^config.data.sources.main.path = 'lm_test_offline': TFDS could not download "
                                        r"and prepare it into .*lm_test_offline.* \(ConnectionError: Failed to resolve "
                                        r".*\)\. Prepare it where the download works \(`tfds build lm_test_offline`\)"):
    sources.check(source_of(data_config(kind="tfds", path="lm_test_offline")))


def test_a_tfds_dataset_whose_download_host_is_unreachable_fails_at_once(tfds_data_dir, monkeypatch):
  for name in ("https_proxy", "http_proxy", "all_proxy"):  # a proxy would take the downloads: no probe then
    monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(name.upper(), raising=False)
  started = time.time()
  with pytest.raises(ConfigError, match=r"^config.data.sources.main.path = 'lm_test_unreachable': TFDS could not "
                                        r"download and prepare it into .*lm_test_unreachable.* \(it is not prepared "
                                        r"there, and its download host lm-test.invalid:443 cannot be reached \(.*\)\)\. "
                                        r"Prepare it where the download works"):
    sources.check(source_of(data_config(kind="tfds", path="lm_test_unreachable")))
  assert time.time() - started < 2 * sources.PROBE_SECONDS + 5


def _latin1(repeat: int) -> bytes:
  return "Très élevé, à côté.\n".encode("latin-1") * repeat  # 6 bytes of 20 are not UTF-8


def test_a_corpus_that_is_not_text_is_refused_naming_the_file(tmp_path):
  write_files(tmp_path, {"a.txt": "text\n\nmore text\n"})
  (tmp_path / "b.txt").write_bytes(b"text, then a binary tail\n" + bytes(range(256)) * 4)
  for kind in ("text_files", "text"):
    with pytest.raises(ConfigError, match=rf"^config.data.sources.main: {tmp_path}/b.txt is binary, not text: it "
                                          r"holds NUL bytes \(4 in [\d,]+\)\. Leave it out of the globs of "
                                          r"config.data.sources.main \(path or validation"):
      texts_of(source_of(data_config(kind=kind, path=f"{tmp_path}/*.txt")))
  (tmp_path / "b.txt").write_bytes(_latin1(30))  # 180 of 600 bytes
  for kind in ("text_files", "text"):
    with pytest.raises(ConfigError, match=rf"{tmp_path}/b.txt is not UTF-8 text: 180 of its 600 bytes are not "
                                          r"UTF-8 \(30.0%; another encoding such as Latin-1"):
      texts_of(source_of(data_config(kind=kind, path=f"{tmp_path}/*.txt")))
  lines = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)).encode()
  (tmp_path / "c.jsonl").write_bytes(lines + b'{"text": "' + _latin1(30).replace(b"\n", b" ") + b'"}\n')
  with pytest.raises(ConfigError, match=rf"{tmp_path}/c.jsonl is not UTF-8 text: 180 of its [\d,]+ bytes"):
    texts_of(source_of(data_config(kind="jsonl", path=f"{tmp_path}/c.jsonl")))
  (tmp_path / "d.jsonl").write_bytes(lines + b"\0" * 8 + b"\n")
  with pytest.raises(ConfigError, match=rf"{tmp_path}/d.jsonl is binary, not text: it holds NUL bytes \(8 in"):
    texts_of(source_of(data_config(kind="jsonl", path=f"{tmp_path}/d.jsonl")))


def test_a_few_bytes_that_are_not_utf8_are_decoded_as_before_and_counted(tmp_path, caplog):
  stray = "x = 'déjà'\n".encode("utf-8") * 40 + _latin1(1)  # 6 stray bytes: kept, as U+FFFD
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "a.py").write_bytes(stray)
  (tmp_path / "src" / "b.py").write_text("clean = 'é'\n" * 30)
  for kind in ("text_files", "text"):
    whole = {"separator": "<none>"} if kind == "text" else {}  # text_files reads no separator
    src = source_of(data_config(kind=kind, path=f"{tmp_path}/src/*.py", **whole))
    assert texts_of(src) == [stray.decode("utf-8", errors="replace"), "clean = 'é'\n" * 30]
    cfg = data_config(kind=kind, path=f"{tmp_path}/src/*.py", tokenizer="byte", data_dir=str(tmp_path / kind),
                      **whole)
    caplog.clear()
    lm_corpus.prepare_all(cfg, 259)
    assert (f"config.data.sources.main: 1 file(s) hold bytes that are not UTF-8, 6 in all, decoded as U+FFFD: "
            f"{tmp_path}/src/a.py (6)") in caplog.text, kind


# --- preparation -----------------------------------------------------------------------------------


def _jsonl_corpus(directory, count=120) -> str:
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "\n", "x = 1", "é", "✓"]
  docs = [" ".join(rng.choice(words, rng.integers(1, 60))) for _ in range(count)]
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / "docs.jsonl", "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
  return str(directory / "docs.jsonl")


def _shard_bytes(directory) -> dict[str, bytes]:
  return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))
          if name.endswith((".tokens", ".ends"))}


def test_preparation_is_the_same_for_any_number_of_workers(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "CHUNK_BYTES", 700)  # ~30 chunks: more than the workers' window
  path = _jsonl_corpus(tmp_path / "src")
  made = {}
  for workers in (1, 2):
    cfg = data_config(kind="jsonl", path=path, tokenizer="byte", workers=workers, shard_tokens=1500,
                      data_dir=str(tmp_path / f"w{workers}"), validation_fraction=0.2)
    _, prepared = lm_corpus.prepare_all(cfg, 259)
    made[workers] = prepared["main"]
  one, two = made[1], made[2]
  assert _shard_bytes(one.directory) == _shard_bytes(two.directory)
  assert one.manifest == two.manifest and len(one.manifest["shards"]) >= 3
  assert one.manifest["dtype"] == "uint16"
  # The stream is the documents framed by the tokenizer, train and held-out ones apart.
  docs = texts_of(one.source)
  for part, wanted in (("train", False), ("validation", True)):
    expected = [i for d in docs if sources.held_out(d, 0.2) == wanted for i in [1, *tokenizers.ByteTokenizer().encode(d), 2]]
    store = one.stores[part]
    assert store.read(0, store.num_tokens)[0].tolist() == expected
  assert 0 < one.stores["validation"].num_documents < one.stores["train"].num_documents


def test_rows_derive_segments_from_document_boundaries(tmp_path):
  cfg = data_config(kind="jsonl", path=_jsonl_corpus(tmp_path / "src"), tokenizer="byte", shard_tokens=700,
                    data_dir=str(tmp_path / "d"))
  _, prepared = lm_corpus.prepare_all(cfg, 259)
  store = prepared["main"].stores["train"]
  stream, boundaries = store.read(0, store.num_tokens)
  ends = np.cumsum([len(d.encode()) + 2 for d in texts_of(prepared["main"].source) if not sources.held_out(d, 0.02)])
  assert boundaries == ends[:-1].tolist()  # every document start but the first, across shard borders
  rows = batching.StoredSequences(store, SEQ_LEN)
  packed = batching.pack(stream, np.concatenate([[0], ends[:-1]]), SEQ_LEN)
  assert len(rows) == len(packed) == store.num_tokens // SEQ_LEN
  read = rows.rows(np.arange(len(rows)))
  for name in batching.ARRAYS:
    np.testing.assert_array_equal(read[name], getattr(packed, name))
  # Segments start at column 0 and wherever a bos (1) starts a document; positions count from each start.
  starts = read["positions"] == 0
  np.testing.assert_array_equal(starts[:, 1:], read["tokens"][:, 1:] == 1)
  assert starts[:, 0].all() and (read["segment_ids"] > 1).any()


def test_a_train_part_that_is_empty_or_shorter_than_a_sequence_says_so(tmp_path):
  write_files(tmp_path / "src", {f"{i}.txt": f"document {i} of a tiny corpus\n" for i in range(6)})
  path = str(tmp_path / "src" / "*.txt")
  held = (r"^config.data.sources.main: its train part is empty: all 6 of its 6 documents are held out for "
          r"validation by validation_fraction = 0.99 .* Lower config.data.sources.main.validation_fraction, add "
          r"documents, or name validation files\.$")
  for tokenizer in ("byte", "sentencepiece"):  # prepared as is; a trained tokenizer would learn from nothing
    cfg = data_config(path=path, validation_fraction=0.99, tokenizer=tokenizer, data_dir=str(tmp_path / tokenizer))
    with pytest.raises(ConfigError, match=held):
      lm_corpus.prepare_all(cfg, 300)
  _, prepared = lm_corpus.prepare_all(data_config(path=path, tokenizer="byte", data_dir=str(tmp_path / "d")), 259)
  with pytest.raises(ConfigError, match=r"^config.train.seq_len = 4,096 is longer than the train part of "
                                        r"config.data.sources.main \(1\d\d tokens\): not one sequence of it"):
    lm_corpus.train_batches(prepared, 4096, 0, 8)


def test_pack_small_example():
  packed = batching.pack(np.array([1, 5, 6, 2, 1, 7, 2, 1, 8, 9, 10, 11, 2]), np.array([0, 4, 7]), 4)
  np.testing.assert_array_equal(packed.tokens, [[1, 5, 6, 2], [1, 7, 2, 1], [8, 9, 10, 11]])
  np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 1]])
  np.testing.assert_array_equal(packed.positions, [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]])


class _Killed(Exception):
  pass


def test_killed_preparation_resumes_keeping_finished_shards(tmp_path, monkeypatch):
  path = _jsonl_corpus(tmp_path / "src", count=200)
  monkeypatch.setattr(sources, "CHUNK_BYTES", 1500)
  settings = dict(kind="jsonl", path=path, tokenizer="byte", shard_tokens=1000, workers=1)
  straight = lm_corpus.prepare_all(data_config(**settings, data_dir=str(tmp_path / "a")), 259)[1]["main"]
  original, calls = sources.decode, []

  def dies_at_chunk_14(chunk):
    calls.append(1)
    if len(calls) == 14:
      raise _Killed()
    return original(chunk)

  monkeypatch.setattr(sources, "decode", dies_at_chunk_14)
  cfg = data_config(**settings, data_dir=str(tmp_path / "b"))
  with pytest.raises(_Killed):
    lm_corpus.prepare_all(cfg, 259)
  directory = lm_corpus.prepared_directory(cfg, cfg.sources[0], tokenizers.ByteTokenizer())
  partial = json.loads((directory / "manifest.json").read_text())
  assert not partial["complete"] and len(partial["shards"]) >= 1
  kept = {n: os.stat(directory / n).st_mtime_ns for n in _shard_bytes(directory)
          if int(n.split("-")[1].split(".")[0]) < len(partial["shards"])}
  monkeypatch.setattr(sources, "decode", original)
  resumed = lm_corpus.prepare_all(cfg, 259)[1]["main"]
  assert _shard_bytes(resumed.directory) == _shard_bytes(straight.directory)
  assert {n: os.stat(directory / n).st_mtime_ns for n in kept} == kept  # finished shards were not redone
  assert resumed.manifest["shards"] == straight.manifest["shards"]
  assert not [n for n in os.listdir(directory) if n.startswith(".writing") or n.endswith(".tmp")]


def test_a_preparation_by_another_process_is_waited_for_and_used(tmp_path, monkeypatch, caplog):
  """Two preparations of one source (prepare_data.py twice, 0.7 s apart) raced on its shard files: the
  second now waits for the lease of the first and uses its result."""
  cfg = data_config(kind="jsonl", path=_jsonl_corpus(tmp_path / "src"), tokenizer="byte",
                    data_dir=str(tmp_path / "d"))
  src, tok = source_of(cfg), tokenizers.ByteTokenizer()
  directory = lm_corpus.prepared_directory(cfg, src, tok)
  directory.mkdir(parents=True)
  other = subprocess.Popen(["sleep", "60"])  # the other preparation's process: alive
  (directory / "lease.json").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "token": "x",
                                                    "started": "just now", "heartbeat": time.time()}))
  prepare_now = prepare.prepare

  def the_other_finishes():
    time.sleep(0.5)
    prepare_now(src, tok, str(directory), identity=sources.identity(src), workers=1, shard_tokens=cfg.shard_tokens)
    (directory / "lease.json").unlink()
    other.kill()

  monkeypatch.setattr(lm_corpus, "WAIT_SECONDS", 0.1)
  monkeypatch.setattr(prepare, "prepare", lambda *a, **k: pytest.fail("prepared beside the other preparation"))
  finisher = threading.Thread(target=the_other_finishes)
  finisher.start()
  try:
    _, prepared = lm_corpus.prepare_all(cfg, 259)
  finally:
    finisher.join()
    other.kill()
  assert prepared["main"].manifest["complete"] and prepared["main"].stores["train"].num_documents > 0
  assert (f"config.data.sources.main is being prepared into {directory} by host {socket.gethostname()}, pid "
          f"{other.pid} (started just now): waiting for it to finish, then using what it prepared.") in caplog.text
  assert not (directory / "lease.json").exists()


def test_damaged_or_foreign_prepared_data_is_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "CHUNK_BYTES", 1500)
  cfg = data_config(kind="jsonl", path=_jsonl_corpus(tmp_path / "src"), tokenizer="byte", shard_tokens=1000,
                    data_dir=str(tmp_path / "d"))
  prepared = lm_corpus.prepare_all(cfg, 259)[1]["main"]
  assert token_store.verify(prepared.directory) == []
  original = _shard_bytes(prepared.directory)
  shard = os.path.join(prepared.directory, "train-00001.tokens")
  content = open(shard, "rb").read()
  with open(shard, "r+b") as f:
    f.write(bytes([content[0] ^ 1]))
  assert token_store.verify(prepared.directory) == [shard]  # a flipped bit: found by the checksum
  store = lm_corpus.prepare_all(cfg, 259)[1]["main"].stores["train"]  # and by training's first read of it
  store.read(0, 10)  # shard 0 is intact
  with pytest.raises(ConfigError, match=r"train-00001.tokens does not match the CRC-32 its preparation "
                                        r"recorded: the prepared data is corrupt. Run .* --repair"):
    store.read(int(store._starts[1]), int(store._starts[1]) + 10)
  kept = os.stat(os.path.join(prepared.directory, "train-00000.tokens")).st_mtime_ns
  assert prepare.repair(prepared.directory) == [shard]  # shard 1 on is prepared again, shard 0 kept
  lm_corpus.prepare_all(cfg, 259)
  assert _shard_bytes(prepared.directory) == original and token_store.verify(prepared.directory) == []
  assert os.stat(os.path.join(prepared.directory, "train-00000.tokens")).st_mtime_ns == kept
  with open(shard, "wb") as f:
    f.write(content[:-3])
  with pytest.raises(ConfigError, match=r"train-00001.tokens is .* bytes, not .*damaged. Run "
                                        r"scripts/prepare_data.py with the same config and --repair"):
    lm_corpus.prepare_all(cfg, 259)
  os.remove(shard)
  with pytest.raises(ConfigError, match="train-00001.tokens is missing"):
    lm_corpus.prepare_all(cfg, 259)


def test_prepared_data_opens_without_its_raw_files_and_never_beside_another_tokenizer(tmp_path):
  src = tmp_path / "src"
  cfg = data_config(kind="jsonl", path=_jsonl_corpus(src), tokenizer="byte", data_dir=str(tmp_path / "d"))
  prepared = lm_corpus.prepare_all(cfg, 259)[1]["main"]
  shutil.rmtree(src)  # a pod trains on what a CPU machine prepared: the raw corpus is not there
  again = lm_corpus.prepare_all(cfg, 259)[1]["main"]
  assert again.directory == prepared.directory and again.stores["train"].num_tokens > 0
  _jsonl_corpus(src)
  other = dataclasses.replace(cfg, tokenizer="huggingface", tokenizer_path=_hf_tokenizer(tmp_path / "hf", None))
  with pytest.raises(ConfigError, match=r"sources.main is prepared in .* with another tokenizer \(main-.*-byte\), "
                                        r"not with huggingface 400.*scripts/prepare_data.py"):
    lm_corpus.prepare_all(other, 512)  # main.py: a forgotten tokenizer flag must not start a preparation
  made = lm_corpus.prepare_all(other, 512, new_tokenizer=True)[1]["main"]  # scripts/prepare_data.py
  assert made.directory != prepared.directory and made.manifest["dtype"] == "uint16"
  assert lm_corpus.prepare_all(other, 512)[1]["main"].directory == made.directory  # now both are there


def test_prepared_data_lands_in_the_configured_remote_directory(tmp_path, monkeypatch):
  from etils.epath import gpath, testing

  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else gs:// goes to tf.io.gfile, unmocked
  bucket = tmp_path / "bucket"
  bucket.mkdir()
  local = lambda p: os.fspath(p).replace("gs://bucket", str(bucket))
  redirect = lambda fn, p, *a, **k: fn(local(p), *a, **k)
  cfg = data_config(kind="jsonl", path=_jsonl_corpus(tmp_path / "src"), tokenizer="byte",
                    data_dir="gs://bucket/prepared_data")
  mocks = {name: redirect for name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
                                       "rename", "replace", "rmtree", "stat", "walk")}
  mocks["glob"] = lambda fn, p: [p.replace(str(bucket), "gs://bucket") for p in fn(local(p))]
  mocks["copy"] = lambda fn, src, dst, **k: fn(local(src), local(dst), **k)
  with testing.mock_epath(**mocks):
    _, prepared = lm_corpus.prepare_all(cfg, 259)
    rows = batching.StoredSequences(prepared["main"].stores["train"], SEQ_LEN).rows(np.array([0, 3]))
  assert prepared["main"].directory.startswith("gs://bucket/prepared_data/prepared/main-")
  written = bucket / prepared["main"].directory.removeprefix("gs://bucket/")
  assert sorted(os.listdir(written)) == ["manifest.json", "train-00000.ends", "train-00000.tokens",
                                         "validation-00000.ends", "validation-00000.tokens"]
  assert not os.path.exists("gs:") and not os.path.exists(tmp_path / "gs:")
  local_copy = lm_corpus.prepare_all(dataclasses.replace(cfg, data_dir=str(tmp_path / "d")), 259)[1]["main"]
  np.testing.assert_array_equal(rows["tokens"], batching.StoredSequences(local_copy.stores["train"], SEQ_LEN).rows(
      np.array([0, 3]))["tokens"])


# --- batches ---------------------------------------------------------------------------------------


def synthetic(num_rows: int, seq_len: int = 3, first: int = 0) -> batching.PackedSequences:
  """Row i holds the value first + i everywhere, so a batch shows which rows it took."""
  rows = np.repeat(np.arange(first, first + num_rows, dtype=np.int32)[:, None], seq_len, axis=1)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), rows.shape)
  return batching.PackedSequences(tokens=rows, segment_ids=np.ones_like(rows), positions=positions)


def test_train_batches_are_a_function_of_seed_and_step():
  packed = {"main": synthetic(12)}
  a, b = batching.TrainBatches(packed, seed=3, global_batch_size=4), batching.TrainBatches(packed, 3, 4)
  for step in (0, 7, 1000):
    for key in batching.ARRAYS:
      np.testing.assert_array_equal(a.get(step)[key], b.get(step)[key])
  np.testing.assert_array_equal(a.get(7)["tokens"][:, 0], a.indices(7))
  other = batching.TrainBatches(packed, seed=4, global_batch_size=4)
  first_epoch = lambda batches: np.concatenate([batches.indices(s) for s in range(3)])
  assert (first_epoch(a) != first_epoch(other)).any()


def test_train_batches_row_slices():
  for sources_ in ({"main": synthetic(20)}, {"a": synthetic(20), "b": synthetic(9, first=100)}):
    batches = batching.TrainBatches(sources_, seed=0, global_batch_size=8)
    full = batches.get(5)
    # Slices, and the scattered positions a process holds when the hosts split an axis other than data.
    for rows in (slice(0, 4), slice(4, 8), slice(2, 3), np.array([0, 1, 4, 5]), np.array([7])):
      part = batches.get(5, rows=rows)
      for key in full:
        np.testing.assert_array_equal(part[key], full[key][rows])
        assert part[key].dtype == np.int32


def test_train_batches_cover_each_epoch_and_reshuffle():
  batches = batching.TrainBatches({"main": synthetic(12)}, seed=0, global_batch_size=4)
  assert batches.steps_per_epoch == 3
  epochs = [np.concatenate([batches.indices(e * 3 + s) for s in range(3)]) for e in range(3)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(12))
  assert (epochs[0] != epochs[1]).any() and (epochs[1] != epochs[2]).any()
  assert (epochs[0] != np.arange(12)).any()


def test_train_batches_larger_than_split():
  with pytest.raises(ConfigError, match="main 5 sequences.*global batch of 8.*micro_batch_size"):
    batching.TrainBatches({"main": synthetic(5)}, seed=0, global_batch_size=8)


def test_mixture_proportions_match_the_weights():
  mixture = {"web": synthetic(1000), "code": synthetic(300, first=10_000), "books": synthetic(50, first=20_000)}
  weights = {"web": 0.6, "code": 0.3, "books": 0.1}
  batches = batching.TrainBatches(mixture, seed=0, global_batch_size=24, weights=weights)
  drawn = np.concatenate([batches.get(s)["tokens"][:, 0] for s in range(400)])  # 9,600 rows
  share = {"web": np.mean(drawn < 10_000), "code": np.mean((drawn >= 10_000) & (drawn < 20_000)),
           "books": np.mean(drawn >= 20_000)}
  for name, weight in weights.items():
    assert abs(share[name] - weight) < 0.005, share
  # Each source runs through its own rows before repeating any: the 50 books rows in the first ~500 draws.
  books = drawn[drawn >= 20_000]
  np.testing.assert_array_equal(np.sort(books[:50]), np.arange(20_000, 20_050))
  again = batching.TrainBatches(mixture, seed=0, global_batch_size=24, weights=weights)
  np.testing.assert_array_equal(again.get(399)["tokens"], batches.get(399)["tokens"])
  assert (batching.TrainBatches(mixture, seed=1, global_batch_size=24, weights=weights).get(0)["tokens"]
          != batches.get(0)["tokens"]).any()
  zero = batching.TrainBatches(mixture, seed=0, global_batch_size=24, weights={**weights, "books": 0.0})
  assert not (np.concatenate([zero.get(s)["tokens"][:, 0] for s in range(50)]) >= 20_000).any()
  with pytest.raises(ConfigError, match=r"the weights of \['books'\] are below 1/2,048 of the total"):
    batching.TrainBatches(mixture, seed=0, global_batch_size=24, weights={**weights, "books": 1e-4})


def test_mixture_weights_are_checked():
  with pytest.raises(ConfigError, match="config.data.sources.main.weight = -0.5 must be a finite number >= 0"):
    data_config(weight=-0.5)
  with pytest.raises(ConfigError, match="every weight is 0"):
    data_config(weight=0.0)


def test_eval_batches_whole_split_or_a_seeded_sample():
  parts = [synthetic(7), synthetic(4, first=100)]
  whole = batching.EvalBatches(parts, 0, 3)
  assert len(whole) == 4 and whole.describe() == "all 11 sequences"
  rows = np.concatenate([b["tokens"][b["segment_ids"].any(axis=1)] for b in whole])
  np.testing.assert_array_equal(rows[:, 0], [0, 1, 2, 3, 4, 5, 6, 100, 101, 102, 103])
  last = whole[3]
  assert last["tokens"].shape == (3, 3) and (last["segment_ids"][2:] == 0).all() and (last["positions"][2:] == 0).all()
  sample = batching.EvalBatches(parts, 5, 2)
  assert sample.describe() == "a seeded random sample of 5 of the 11 sequences" and len(sample) == 3
  picked = np.concatenate([b["tokens"][b["segment_ids"].any(axis=1)] for b in sample])[:, 0]
  assert len(set(picked.tolist())) == 5 and list(picked) == sorted(picked)
  np.testing.assert_array_equal(picked, np.concatenate([b["tokens"][b["segment_ids"].any(axis=1)]
                                                        for b in batching.EvalBatches(parts, 5, 4)])[:, 0])
  for rows in (np.array([0, 1]), np.array([1]), slice(1, 2)):  # a process's rows of a padded batch
    for name in batching.ARRAYS:
      np.testing.assert_array_equal(whole.get(3, rows)[name], whole[3][name][rows])
  assert batching.EvalBatches(parts, 64, 2).num_sequences == 11


def test_targets_and_loss_mask_numpy_and_jax():
  import jax.numpy as jnp

  tokens = np.array([[1, 5, 6, 1, 7, 0, 0]], np.int32)
  segment_ids = np.array([[1, 1, 1, 2, 2, 0, 0]], np.int32)
  expected_mask = [[True, True, False, True, False, False, False]]
  np.testing.assert_array_equal(batching.targets(tokens), [[5, 6, 1, 7, 0, 0, 0]])
  np.testing.assert_array_equal(batching.loss_mask(segment_ids), expected_mask)
  np.testing.assert_array_equal(np.asarray(batching.targets(jnp.asarray(tokens))), [[5, 6, 1, 7, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(batching.loss_mask(jnp.asarray(segment_ids))), expected_mask)
  assert batching.loss_mask(segment_ids).dtype == bool
