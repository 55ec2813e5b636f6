"""Conversations as a model's own files define them: its chat template and the ids that end a turn.

A Hugging Face model directory (or an import of one, which copies these files beside its tokenizer) holds
its chat template as `chat_template.jinja` (what transformers 5 writes), or as the `chat_template` of
`tokenizer_config.json` (older ones; a list of named templates: the one named "default"). It is rendered
with jinja2 as transformers renders it: a sandboxed environment with trim_blocks and lstrip_blocks, loop
controls, `tojson` without HTML escapes, `raise_exception` and `strftime_now`, the special tokens of
tokenizer_config.json (bos_token, eos_token, ...) as variables. The rendered text's ids are then the
tokenizer's ids of it with no special token added (`Tokenizer.encode`), as `apply_chat_template(messages,
add_generation_prompt=True)` gives them.

Generation ends at the ids of `generation_config.json` (`eos_token_id`, one or a list: SmolLM2-Instruct's
<|im_end|>) and at the tokenizer's end of document.

A model without a template (the byte tokenizer, a tokenizer the run trained) has the plain one of this
module (PLAIN_VERSION): each message as "role: content\n", the generation prompt "assistant: "; in training
ids each assistant turn is followed by the tokenizer's end-of-document id (an id, not text), so that a
model fine-tuned on it stops where it was taught to (generation ends at that id).

Training ids (`Chat.tokenize`, SFT's chat sources) are made piecewise so that they match inference exactly:
the text before each learned assistant message is render(messages[:i], add_generation_prompt=True), the
ids sample.py --chat feeds the model; the assistant's span is what render(messages[:i + 1]) adds to it (its
content and the template's end of turn, e.g. SmolLM2's "<|im_end|>\n"). Each piece is encoded alone
(`Tokenizer.encode_special`: the rendered text holds its own BOS when the template writes one), and the
assistant's pieces are the tokens learned.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import os

from etils import epath
import numpy as np

from lm.errors import ConfigError

TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant", "tool")
PLAIN_VERSION = 1  # of the plain template: part of the key of data prepared with it
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclasses.dataclass(frozen=True)
class Chat:
  """What a model's directory says about conversations."""
  template: str | None  # None: the model has no chat template
  special_tokens: dict[str, str]  # the template's variables bos_token, eos_token, ... (those it names)
  stop_ids: tuple[int, ...]  # generation ends at any of them
  where: str  # the directory read, for messages

  def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as the template writes it (the plain one without a template), ending with the
    assistant's header when asked."""
    check_messages(messages, self.where)
    if self.template is None:
      return _plain(messages, add_generation_prompt)
    import jinja2  # here: only conversations need it

    try:
      return _compiled(self.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             tools=None, documents=None, **self.special_tokens)
    except jinja2.TemplateError as e:
      raise ConfigError(f"The chat template of {self.where} refused the conversation: {e}") from e

  @property
  def fingerprint(self) -> str:
    """Changes whenever the training ids of a conversation may: the template and its variables."""
    what = [self.template, self.special_tokens] if self.template is not None else f"plain-{PLAIN_VERSION}"
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

  def tokenize(self, messages: list[dict], tokenizer, learn_from: int = 0,
               where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The conversation's ids (int32) and which of them are learned (bool): the tokens of its assistant
    messages from index `learn_from` on (TRL's prompt-completion: the completion's), with the template's
    end of turn (the plain template: the end-of-document id)."""
    ids, learn = [], []
    end = [tokenizer.eos_id] if self.template is None and tokenizer.eos_id is not None else []
    for text, learned in self._pieces(messages, learn_from, where or self.where):
      piece = (tokenizer.encode_special(text) if text else []) + (end if learned else [])
      ids += piece
      learn += [learned] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(learn, bool)

  def _pieces(self, messages: list[dict], learn_from: int, where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, learned): the text before each learned assistant message,
    then that message's span; the rest last."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
      if message.get("role") != "assistant" or i < learn_from:
        continue
      prompt, whole = self.render(messages[:i], True), self.render(messages[:i + 1], False)
      if not (prompt.startswith(done) and whole.startswith(prompt)):
        raise ConfigError(f"{where}: the chat template of {self.where} rewrites earlier turns (the rendering up "
                          f"to message {i} with the generation prompt is not the start of the rendering with "
                          "it): the ids trained on would not be the ones the model sees at inference. Use a "
                          "template that appends each turn, or give such conversations one assistant message.")
      pieces += [(prompt[len(done):], False), (whole[len(prompt):], True)]
      done = whole
    if not pieces:
      raise ConfigError(f"{where}: the conversation has no assistant message to learn"
                        f"{' in its completion' if learn_from else ''}: {json.dumps(messages)[:200]}")
    whole = self.render(messages, False)
    if not whole.startswith(done):
      raise ConfigError(f"{where}: the chat template of {self.where} rewrites earlier turns once later ones follow.")
    return pieces + [(whole[len(done):], False)]


def _plain(messages: list[dict], add_generation_prompt: bool) -> str:
  """The plain template (a model without one): "role: content\n" each, then "assistant: " when asked."""
  return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if add_generation_prompt else "")


def messages(prompt: str, system: str | None = None) -> list[dict]:
  """A one-turn conversation: the prompt as the user's message, after a system message when given."""
  return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def check_messages(conversation, where: str) -> None:
  """ConfigError unless the conversation is a list of {"role": one of ROLES, "content": str}."""
  if not isinstance(conversation, list) or not conversation:
    raise ConfigError(f"{where}: a conversation is a non-empty list of messages, not {conversation!r:.100}.")
  for i, message in enumerate(conversation):
    if not (isinstance(message, dict) and message.get("role") in ROLES
            and isinstance(message.get("content"), str)):
      raise ConfigError(f"{where}: message {i} is {message!r:.200}; each message is "
                        f'{{"role": one of {", ".join(ROLES)}, "content": "text"}}.')


def read(directory: str | None, eos_id: int | None, token_ids) -> Chat:
  """The chat of the model files in `directory` (None: a tokenizer without files, e.g. the byte tokenizer or
  one the run trained: no template). `token_ids(text)` gives a special token's id (None when unknown)."""
  stops = [] if eos_id is None else [eos_id]
  if directory is None:
    return Chat(None, {}, tuple(stops), "the run's tokenizer")
  folder = epath.Path(directory)
  settings = _json(folder / "tokenizer_config.json")
  special = {}
  for name in _SPECIAL_TOKENS:
    value = settings.get(name)
    value = value.get("content") if isinstance(value, dict) else value
    if isinstance(value, str):
      special[name] = value
  generation = _json(folder / "generation_config.json").get("eos_token_id")
  for i in generation if isinstance(generation, list) else [generation]:
    if isinstance(i, int) and i not in stops:
      stops.append(i)
  named_eos = token_ids(special["eos_token"]) if "eos_token" in special else None
  if named_eos is not None and named_eos not in stops:
    stops.append(named_eos)
  return Chat(_template(folder, settings), special, tuple(stops), os.fspath(folder))


def _template(folder: epath.Path, settings: dict) -> str | None:
  if (folder / TEMPLATE_FILE).is_file():
    return (folder / TEMPLATE_FILE).read_text()
  template = settings.get("chat_template")
  if isinstance(template, list):  # named templates: the default one
    template = next((t.get("template") for t in template if t.get("name") == "default"), None)
  return template if isinstance(template, str) else None


def _json(path: epath.Path) -> dict:
  if not path.is_file():
    return {}
  try:
    value = json.loads(path.read_text())
  except ValueError as e:
    raise ConfigError(f"{path} is not JSON ({e}); restore it from the model's files.") from e
  return value if isinstance(value, dict) else {}


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
  """The template in transformers' environment (jinja2's sandbox, which refuses unsafe attribute access)."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (the assistant's part, for training masks): its text as is."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise ConfigError(f"The chat template is not valid Jinja (line {e.lineno}: {e.message}).") from e
