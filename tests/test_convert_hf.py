"""scripts/convert_hf.py against transformers: logits of imported and exported models, round trips, bad input.

transformers runs in its own venv (.venv-hf, Python 3.11 with the CPU build of torch, made by
scripts/install.sh), once for all models: tests/hf_reference.py builds small random models of each family,
saves them as safetensors checkpoints and computes their logits, and loads the checkpoints this project
exported and computes theirs.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.checkpoints import checkpoint, param_files
from lm.errors import ConfigError
from lm.model.decoder import Decoder
from lm.tools import hf
from tests.helpers import FAST_COMPILE, load_script, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_PYTHON = os.path.join(ROOT, ".venv-hf", "bin", "python")
VOCAB, B, L = 320, 2, 24  # 320: the 300 ids of write_hf_tokenizer's tokenizer fit, for the training run below
TOLERANCE = 1e-5  # relative error of float32 logits: max |ours - theirs| / max |theirs|

_common = dict(vocab_size=VOCAB, max_position_embeddings=64)
_text_gemma = dict(_common, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=32, sliding_window=6, query_pre_attn_scalar=24,
                   rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rms_norm_eps=1e-6)
# name: (architecture, config.json keys). The shapes vary what the converter must get right: grouped-query
# ratios 1, 2, 4 and 8, head_dim equal to and different from hidden_size / heads, tied and untied heads,
# Gemma3's layer pattern (7 layers: 5 local, 1 global, 1 local), its query scale, linear RoPE scaling.
HF_MODELS = {
    "llama_gqa2_untied": ("LlamaForCausalLM", dict(
        _common, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10_000.0, tie_word_embeddings=False)),
    "llama_mha_head_dim24_tied": ("LlamaForCausalLM", dict(
        _common, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=24, rms_norm_eps=1e-6, rope_theta=500_000.0, tie_word_embeddings=True)),
    "qwen3_gqa4_tied": ("Qwen3ForCausalLM", dict(
        _common, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True)),
    "qwen3_gqa4_head_dim32_untied": ("Qwen3ForCausalLM", dict(
        _common, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False)),
    # The shapes of tests/test_train.py's tiny run, which trains it further through main.py.
    "qwen3_for_training": ("Qwen3ForCausalLM", dict(
        _common, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True)),
    "gemma3_pattern_mqa_tied": ("Gemma3ForCausalLM", _text_gemma),
    "gemma3_scaled_gqa2_untied": ("Gemma3ForCausalLM", dict(
        _common, hidden_size=48, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=16, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
        tie_word_embeddings=False)),
    "gemma3_multimodal": ("Gemma3ForConditionalGeneration", dict(
        text_config=_text_gemma, mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14))),
}
# This project's models exported to each family: name -> (family, model overrides).
OURS = {
    "ours_llama": dict(name="llama", num_heads=4, num_kv_heads=2, head_dim=16),
    "ours_qwen3_unscanned": dict(name="qwen3", qk_norm=True, num_heads=4, num_kv_heads=2, head_dim=24,
                                 tie_embeddings=True, rope_theta=1e6, scan_layers=False),
    "ours_gemma3": dict(name="gemma3", qk_norm=True, post_norms=True, norm_unit_offset=True,
                        mlp_activation="gelu_tanh", embed_scale=True, query_scale_dim=20, num_layers=4,
                        sliding_window=5, local_layers_per_global=2, rope_theta=1e6, rope_local_theta=1e4,
                        rope_scaling_factor=4.0, num_heads=4, num_kv_heads=1, head_dim=16, norm_eps=1e-6),
}


convert = load_script("convert_hf")


def ours_config(overrides):
  return tiny_model(**{**dict(vocab_size=VOCAB, d_model=64, mlp_dim=96, num_layers=3, init_std=0.15), **overrides})


def random_params(cfg, seed):
  """Normal matrices of std init_std, and norm scales off their initial 1 (or 0), in numpy: faster than
  compiling the initialiser."""
  rng = np.random.default_rng(seed)
  start = 0.0 if cfg.norm_unit_offset else 1.0

  def draw(path, shape):
    if "scale" in jax.tree_util.keystr(path):
      return (start + 0.2 * rng.standard_normal(shape.shape)).astype(np.float32)
    return (cfg.init_std * rng.standard_normal(shape.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, convert.abstract_params(cfg))


def forward(cfg, params, tokens):
  segments = jnp.ones(tokens.shape, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(jax.jit(lambda p: Decoder(cfg).apply({"params": p}, tokens, segments, positions))(params))


def relative_error(ours, theirs):
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Runs transformers once: builds HF_MODELS, loads the exports of OURS; returns the directories."""
  if not os.path.exists(HF_PYTHON):
    pytest.fail(f"{HF_PYTHON} is missing: run `bash scripts/install.sh`, which creates the transformers venv.")
  root = tmp_path_factory.mktemp("hf")
  tokens = np.random.default_rng(0).integers(0, VOCAB, (B, L)).tolist()
  models = [{"name": name, "build": {"architecture": arch, "config": config, "seed": i},
             "save": str(root / name)} for i, (name, (arch, config)) in enumerate(HF_MODELS.items())]
  ours = {}
  for i, (name, overrides) in enumerate(OURS.items()):
    cfg = ours_config(overrides)
    params = random_params(cfg, seed=100 + i)
    param_files.save_params(str(root / f"{name}_params"), params, dataclasses.asdict(cfg), source="test")
    # Small shards: transformers must also find every tensor through the index.
    convert.export_hf(str(root / f"{name}_params"), str(root / name), max_shard_bytes=100_000)
    ours[name] = (cfg, params)
    models.append({"name": name, "load": str(root / name)})
  spec = root / "spec.json"
  spec.write_text(json.dumps({"tokens": tokens, "out": str(root), "models": models}))
  run = subprocess.run([HF_PYTHON, os.path.join(ROOT, "tests", "hf_reference.py"), str(spec)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  assert run.returncode == 0, run.stderr[-5000:]
  return {"root": root, "tokens": jnp.array(tokens, jnp.int32), "ours": ours,
          "report": json.loads((root / "report.json").read_text())}


@pytest.mark.parametrize("name", HF_MODELS)
def test_imported_model_gives_the_logits_of_transformers(reference, name, tmp_path):
  cfg = convert.import_hf(str(reference["root"] / name), str(tmp_path / "imported"))
  params, saved_model = param_files.load_params_on_host(str(tmp_path / "imported"))
  assert saved_model == dataclasses.asdict(cfg)
  theirs = np.load(reference["root"] / f"{name}.npy")
  error = relative_error(forward(cfg, params, reference["tokens"]), theirs)
  assert error < TOLERANCE, f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("name", OURS)
def test_exported_model_gives_our_logits_in_transformers(reference, name):
  info = reference["report"][name]
  assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
  cfg, params = reference["ours"][name]
  theirs = np.load(reference["root"] / f"{name}.npy")
  error = relative_error(forward(cfg, params, reference["tokens"]), theirs)
  assert error < TOLERANCE, f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("name", OURS)
def test_export_then_import_gives_identical_weights(reference, name, tmp_path):
  cfg, params = reference["ours"][name]
  imported = convert.import_hf(str(reference["root"] / name), str(tmp_path / "back"))
  assert imported == dataclasses.replace(cfg, init_std=imported.init_std, scan_layers=True)
  back, _ = param_files.load_params_on_host(str(tmp_path / "back"))
  if not cfg.scan_layers:  # the import scans; unstack to compare with the unscanned original
    back = {**{k: v for k, v in back.items() if k != "layers"},
            **{f"layers_{i}": jax.tree.map(lambda x: x[i], back["layers"]) for i in range(cfg.num_layers)}}
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("name", ["llama_gqa2_untied", "qwen3_gqa4_tied", "gemma3_pattern_mqa_tied"])
def test_import_then_export_gives_identical_tensors(reference, name, tmp_path):
  convert.import_hf(str(reference["root"] / name), str(tmp_path / "ours"))
  convert.export_hf(str(tmp_path / "ours"), str(tmp_path / "hf"))
  original = hf.read_tensors(str(reference["root"] / name))
  again = hf.read_tensors(str(tmp_path / "hf"))
  assert set(again) == set(original)
  for key in original:
    np.testing.assert_array_equal(again[key], original[key], err_msg=key)


def test_bfloat16_export_in_shards_imports_as_the_rounded_weights(reference, tmp_path):
  _, params = reference["ours"]["ours_gemma3"]
  assert convert.main(["export", f"--checkpoint={reference['root'] / 'ours_gemma3_params'}",
                       f"--out={tmp_path / 'hf'}", "--dtype=bfloat16", "--max_shard_bytes=20000"]) == 0
  index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert hf.read_tensors(str(tmp_path / "hf"))["model.embed_tokens.weight"].dtype == jnp.bfloat16
  convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
  back, _ = param_files.load_params_on_host(str(tmp_path / "back"))
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), params)
  jax.tree.map(np.testing.assert_array_equal, back, rounded)


def test_unsupported_architecture_is_named(tmp_path, capsys):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"],
                                                     "model_type": "mistral"}))
  assert convert.main(["import", f"--hf_dir={tmp_path}", f"--out={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err
  assert "architectures = ['MistralForCausalLM']" in err and "is not supported" in err


def test_shapes_that_do_not_match_the_config_name_the_tensor(reference, tmp_path, capsys):
  """qwen3_gqa4_tied has 2 key/value heads of 16; configs/qwen3_1_8b.py, shrunk, expects 8 of 128."""
  config = tmp_path / "small_qwen3.py"
  config.write_text(
      "from configs import qwen3_1_8b\n\ndef get_config():\n  c = qwen3_1_8b.get_config()\n"
      f"  c.model.vocab_size, c.model.d_model, c.model.num_layers, c.model.mlp_dim = {VOCAB}, 64, 2, 96\n"
      "  return c\n")
  code = convert.main(["import", f"--hf_dir={reference['root'] / 'qwen3_gqa4_tied'}",
                       f"--out={tmp_path / 'out'}", f"--config={config}"])
  err = capsys.readouterr().err
  assert code == 2
  assert "tensor model.layers.0.self_attn.q_proj.weight has shape (128, 64), the config expects (2048, 64)" in err


def test_tensors_that_contradict_their_config_json_are_named(reference, tmp_path, capsys):
  source = reference["root"] / "llama_gqa2_untied"
  broken = tmp_path / "broken"
  broken.mkdir()
  config = json.loads((source / "config.json").read_text())
  config["intermediate_size"] = 128
  (broken / "config.json").write_text(json.dumps(config))
  os.symlink(source / "model.safetensors", broken / "model.safetensors")
  assert convert.main(["import", f"--hf_dir={broken}", f"--out={tmp_path / 'out'}"]) == 2
  assert ("tensor model.layers.0.mlp.down_proj.weight has shape (64, 96), the config expects (64, 128)"
          in capsys.readouterr().err)


def test_settings_that_do_not_match_the_config_are_named(reference, tmp_path, capsys):
  """The tensors fit, but config.json's RoPE base is not the config's."""
  source = reference["root"] / "llama_gqa2_untied"
  config = tmp_path / "llama.py"
  config.write_text(
      "from configs import base\n\ndef get_config():\n  c = base.get_config()\n"
      f"  c.model.vocab_size, c.model.d_model, c.model.num_layers, c.model.mlp_dim = {VOCAB}, 64, 2, 96\n"
      "  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 16\n"
      "  c.model.rope_theta = 500000.0\n  return c\n")
  assert convert.main(["import", f"--hf_dir={source}", f"--out={tmp_path / 'out'}", f"--config={config}"]) == 2
  err = capsys.readouterr().err
  assert f"model.rope_theta = 500000.0 in {config}, 10000.0 in config.json" in err, err


def test_restoring_parameters_of_other_shapes_names_the_tensor(tmp_path):
  small = ours_config(OURS["ours_llama"])
  param_files.save_params(str(tmp_path / "small"), random_params(small, 0), dataclasses.asdict(small), source="test")
  wider = dataclasses.replace(small, mlp_dim=128)
  with pytest.raises(ConfigError, match=r"tensor layers/mlp/down_proj has shape \(3, 96, 64\) there, "
                                        r"\(3, 128, 64\) in this config"):
    param_files.restore_params(str(tmp_path / "small"), convert.abstract_params(wider))


def test_main_trains_further_from_an_imported_checkpoint(reference, tmp_path):
  """Fine-tuning through main.py: a Qwen3 imported from transformers with its tokenizer (a BPE
  tokenizer.json, as Qwen3's), two steps at a small learning rate with that tokenizer. The saved parameters
  moved from the imported ones, but by no more than the steps could move them; the export has the tokenizer."""
  hf_dir = tmp_path / "hf_in"
  shutil.copytree(reference["root"] / "qwen3_for_training", hf_dir)
  write_hf_tokenizer(hf_dir)
  convert.import_hf(str(hf_dir), str(tmp_path / "imported"))
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for name in ("textwrap.py", "csv.py", "shlex.py", "fractions.py"):
    shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], name), corpus)
  learning_rate, steps = 1e-4, 2
  overrides = dict(
      model=dict(name="qwen3", qk_norm=True, tie_embeddings=True, rope_theta=1e6, norm_eps=1e-6,
                 vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=128, max_seq_len=64, scan_layers=True),  # the layout the import wrote
      data={"tokenizer": "huggingface", "tokenizer_path": tmp_path / "imported" / "tokenizer.json",
            "eval_sequences": 8, "data_dir": tmp_path / "data", "sources.main.path": f"{corpus}/*.py",
            "sources.main.validation": corpus / "shlex.py"},
      train=dict(init_from=str(tmp_path / "imported"), seq_len=64, micro_batch_size=2, num_train_steps=steps,
                 learning_rate=learning_rate, warmup_steps=0, schedule="constant", save_interval_steps=steps,
                 eval_interval_steps=steps, log_interval_steps=1))
  flags = [f"--config.{section}.{key}={value}" for section, values in overrides.items() for key, value in values.items()]
  run = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), f"--config={ROOT}/configs/default.py",
                        f"--workdir={tmp_path / 'run'}", *flags], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}",
                                         "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"Initialised from:     {tmp_path / 'imported'}" in run.stderr
  assert f"huggingface 300 ({tmp_path / 'imported' / 'tokenizer.json'}; input framing none, separator <|endoftext|>)" in run.stderr
  assert f"step {steps}/{steps} | loss" in run.stderr
  imported, _ = param_files.load_params_on_host(str(tmp_path / "imported"))
  trained, model = param_files.load_params_on_host(str(tmp_path / "run" / "checkpoints"))
  assert model["name"] == "qwen3" and jax.tree.structure(trained) == jax.tree.structure(imported)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(imported)))
  # An AdamW step moves each parameter by about the learning rate; a fresh initialisation is ~0.02-1 away.
  assert 0 < moved < 3 * steps * learning_rate, moved
  # And back out: the run's newest checkpoint as a Hugging Face directory.
  assert convert.main(["export", f"--checkpoint={tmp_path / 'run' / 'checkpoints'}", f"--out={tmp_path / 'hf'}"]) == 0
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
  for name in TOKENIZER_FILES:
    assert (tmp_path / "hf" / name).read_bytes() == (hf_dir / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------------
# Tokenizer files: import copies them, export writes them beside the weights. A Hugging Face directory of
# this project's export (no transformers needed) with a tiny BPE tokenizer.json, as Qwen3's is.

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def write_hf_tokenizer(directory):
  """A 300-id BPE tokenizer.json whose end of text is <|endoftext|>, with a tokenizer_config.json naming it
  (and no bos, as Qwen3's) and a generation_config.json; returns the id of <|endoftext|>."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  texts = ["def add(a, b):\n  return a + b\n", "The quick brown fox jumps over the lazy dog.",
           "import os\nprint(os.getcwd())\n", "class Point:\n  x: int\n  y: int\n"] * 4
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))
  eos = tok.token_to_id("<|endoftext|>")
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
  return eos


@pytest.fixture
def small_qwen3(tmp_path):
  """(config, parameters, their save_params directory, a Hugging Face directory of them without tokenizer)."""
  cfg = ours_config(OURS["ours_qwen3_unscanned"])
  params = random_params(cfg, seed=7)
  param_files.save_params(str(tmp_path / "params"), params, dataclasses.asdict(cfg), source="test")
  convert.export_hf(str(tmp_path / "params"), str(tmp_path / "hf"))
  return cfg, params, tmp_path / "params", tmp_path / "hf"


def test_import_copies_the_tokenizer_and_prints_its_overrides(small_qwen3, tmp_path, capsys):
  from lm.data import tokenizer

  _, params, _, hf_dir = small_qwen3
  eos = write_hf_tokenizer(hf_dir)
  out = tmp_path / "imported"
  assert convert.main(["import", f"--hf_dir={hf_dir}", f"--out={out}"]) == 0
  for name in TOKENIZER_FILES:
    assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name
  assert not (out / "tokenizer.model").exists()
  stdout = capsys.readouterr().out
  assert f"--config.data.tokenizer=huggingface --config.data.tokenizer_path={out / 'tokenizer.json'}" in stdout
  for path in (out, out / "tokenizer.json"):  # the directory, or the file the overrides name
    tok = tokenizer.read("huggingface", str(path))
    assert (tok.eos_id, tokenizer.encode_input(tok, "ab"), tok.vocab_size) == (eos, tok.encode("ab"), 300)
    assert tok.decode(tok.encode("def add(a, b):")) == "def add(a, b):"
  # The weights are the ones exported, untouched by the copy.
  back, _ = param_files.load_params_on_host(str(out))
  back = {**{k: v for k, v in back.items() if k != "layers"},
          **{f"layers_{i}": jax.tree.map(lambda x: x[i], back["layers"]) for i in range(3)}}
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_export_writes_the_imported_tokenizer_beside_the_weights(small_qwen3, tmp_path, capsys):
  _, _, _, hf_dir = small_qwen3
  write_hf_tokenizer(hf_dir)
  convert.import_hf(str(hf_dir), str(tmp_path / "imported"))
  assert convert.main(["export", f"--checkpoint={tmp_path / 'imported'}", f"--out={tmp_path / 'again'}"]) == 0
  assert "Copied tokenizer.json, tokenizer_config.json, generation_config.json" in capsys.readouterr().out
  for name in TOKENIZER_FILES:
    assert (tmp_path / "again" / name).read_bytes() == (hf_dir / name).read_bytes(), name
  original, again = hf.read_tensors(str(hf_dir)), hf.read_tensors(str(tmp_path / "again"))
  assert set(again) == set(original)
  for key in original:
    np.testing.assert_array_equal(again[key], original[key], err_msg=key)


def test_import_without_tokenizer_files_warns(small_qwen3, tmp_path, capsys):
  _, _, _, hf_dir = small_qwen3
  assert convert.main(["import", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'imported'}"]) == 0
  assert f"Warning: {hf_dir} has no tokenizer (tokenizer.json or tokenizer.model)" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path / "imported")) == ["model.json", "params"]


@pytest.mark.parametrize("kind", ["huggingface", "sentencepiece", "byte"])
def test_export_of_a_run_writes_the_tokenizer_its_config_names(small_qwen3, tmp_path, kind, capsys):
  """A run's checkpoint directory: the tokenizer is the one of its saved config's data section."""
  from configs import base
  from lm.config import from_config_dict, to_dict

  cfg, _, params_dir, _ = small_qwen3
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  write_hf_tokenizer(tok_dir)
  (tok_dir / "spm.model").write_bytes(b"a SentencePiece model: copied, never parsed")
  named = {"huggingface": str(tok_dir), "sentencepiece": str(tok_dir / "spm.model"), "byte": ""}[kind]
  config = to_dict(from_config_dict(base.get_config()))
  config["model"] = dataclasses.asdict(cfg)
  config["data"].update(tokenizer=kind, tokenizer_path=named)
  params, _ = param_files.load_params_on_host(str(params_dir))
  saver = checkpoint.Checkpoints(str(tmp_path / "run"), from_config_dict(base.get_config()).train)
  saver.save(5, {"params": params}, config)
  saver.finish()
  assert convert.main(["export", f"--checkpoint={tmp_path / 'run'}", f"--out={tmp_path / 'hf_run'}"]) == 0
  written = {"huggingface": {name: name for name in TOKENIZER_FILES}, "sentencepiece": {"tokenizer.model": "spm.model"},
             "byte": {}}[kind]
  assert sorted(n for n in os.listdir(tmp_path / "hf_run") if not n.startswith(("model", "config"))) == sorted(written)
  for name, source in written.items():
    assert (tmp_path / "hf_run" / name).read_bytes() == (tok_dir / source).read_bytes(), name
  stdout = capsys.readouterr().out
  assert ("the byte tokenizer, which has no files" in stdout if kind == "byte" else
          f"the run's data.tokenizer_path {named}" in stdout)


def _a_run(small_qwen3, workdir):
  """A run's workdir as main.py leaves it: checkpoints/ holding step 5 (with its config), metrics.jsonl."""
  from configs import base
  from lm.config import from_config_dict, to_dict

  cfg, _, params_dir, _ = small_qwen3
  config = to_dict(from_config_dict(base.get_config()))
  config["model"] = dataclasses.asdict(cfg)
  params, _ = param_files.load_params_on_host(str(params_dir))
  saver = checkpoint.Checkpoints(str(workdir / "checkpoints"), from_config_dict(base.get_config()).train)
  saver.save(5, {"params": params}, config)
  saver.finish()
  (workdir / "metrics.jsonl").write_text("")
  return workdir


def test_export_of_a_workdir_or_into_a_file_names_the_flag_and_the_fix(small_qwen3, tmp_path, capsys):
  workdir = _a_run(small_qwen3, tmp_path / "run")
  assert convert.main(["export", f"--checkpoint={workdir}", f"--out={tmp_path / 'hf_run'}"]) == 2
  assert (f"Conversion error: {workdir} is a run's --workdir, not its checkpoint directory: name "
          f"{workdir}/checkpoints, where its steps are") in capsys.readouterr().err
  (tmp_path / "a_file").write_text("kept")
  for out in (tmp_path / "a_file", tmp_path / "a_file" / "hf"):
    assert convert.main(["export", f"--checkpoint={workdir}/checkpoints", f"--out={out}"]) == 2
    err = capsys.readouterr().err
    assert f"Conversion error: --out={out} is " in err and "not a directory: name a directory for the Hugging " \
                                                           "Face files" in err, err
  assert (tmp_path / "a_file").read_text() == "kept" and not (tmp_path / "hf_run").exists()


def test_reading_a_step_logs_no_missing_metadata_warning(small_qwen3, tmp_path, caplog):
  """orbax warned "Metadata file does not exist: <step>/state/_CHECKPOINT_METADATA" at every read of a step's
  parameters (export, eval, sample.py), which users took for damage: it is expected there."""
  workdir = _a_run(small_qwen3, tmp_path / "run")
  caplog.set_level("WARNING")
  param_files.load_params_on_host(str(workdir / "checkpoints"))
  assert "Metadata file does not exist" not in caplog.text
  from absl import logging
  logging.warning("Metadata file does not exist: %s", "elsewhere/_CHECKPOINT_METADATA")  # others still pass
  assert "Metadata file does not exist: elsewhere" in caplog.text


def test_lora_adapters_round_trip_through_peft_names():
  """Every adapter of a LoRA model becomes one PEFT matrix per layer (lora_A [rank, in], lora_B [out, rank])
  and comes back unchanged."""
  from flax import linen as nn

  from lm.model import lora
  cfg = tiny_model(lora_rank=4, lora_alpha=8.0)
  params = Decoder(cfg).init(jax.random.key(0), *(jnp.zeros((1, 4), jnp.int32),) * 3)["params"]
  adapters = jax.tree.map(np.asarray, lora.split(nn.unbox(params))[1])
  adapters = jax.tree.map(lambda a: np.random.default_rng(a.size).standard_normal(a.shape).astype(np.float32), adapters)
  peft = hf.to_peft(adapters)
  assert len(peft) == 2 * 7 * cfg.num_layers  # A and B of q, k, v, o, gate, up, down in every layer
  q_a = peft["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"]
  down_b = peft["base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"]
  assert q_a.shape == (4, cfg.d_model) and down_b.shape == (cfg.d_model, 4)
  back = hf.from_peft(peft, adapters)
  jax.tree.map(np.testing.assert_array_equal, back, adapters)
