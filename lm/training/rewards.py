"""GRPO's prompts and rewards: tasks whose answers can be checked, and reward functions (config.grpo.task,
config.grpo.rewards name them as `module.function`, so a user's own module plugs in the same way).

A task is `task(seed, split, indices, cfg) -> (prompts, answers)`: the problems at those indices of the
split ("train" or "eval", disjoint streams), lists of strings, the same for the same arguments; prompts may
differ in length.

A reward function is `reward(completions, answers) -> sequence of floats`, one per completion: the text
the model wrote after the prompt (up to its end-of-sequence), and the task's answer of its prompt. The
rewards of all functions named are added.

Needs numpy alone (etils to read a dataset): scripts/trl_grpo.py imports the same tasks and rewards into TRL's
venv, which has no jax.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re

from typing import TYPE_CHECKING

import numpy as np

from lm.errors import ConfigError

if TYPE_CHECKING:
  from lm.config import GRPOConfig


_SPLITS = {"train": 0, "eval": 1}


def arithmetic(seed: int, split: str, indices, cfg: GRPOConfig) -> tuple[list[str], list[str]]:
  """Additions of two integers in 0..max_operand, written with a fixed width ("07+45="); the answer is the
  sum ("52"). Problem i of a split depends on (seed, split, i) alone. Needs no network and no dataset."""
  width = len(str(cfg.max_operand))
  prompts, answers = [], []
  for i in indices:
    a, b = np.random.default_rng([seed, _SPLITS[split], int(i)]).integers(0, cfg.max_operand + 1, 2)
    prompts.append(f"{a:0{width}d}+{b:0{width}d}=")
    answers.append(str(a + b))
  return prompts, answers


@functools.cache
def _problems(path: str) -> tuple[tuple[str, str], ...]:
  from etils import epath  # local or gs://; not needed by the generated tasks
  rows = []
  with epath.Path(path).open() as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        rows.append((str(record["prompt"]), str(record["answer"])))
      except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"config.grpo.dataset = {path!r}, line {number}: not a JSON object with \"prompt\" "
                          f"and \"answer\" ({type(e).__name__}: {e}).") from e
  return tuple(rows)


def jsonl_problems(seed: int, split: str, indices, cfg: GRPOConfig) -> tuple[list[str], list[str]]:
  """Problems of a JSON Lines file (config.grpo.dataset, local or gs://), {"prompt": ..., "answer": ...}
  per line. The first config.grpo.eval_prompts lines are the eval split, the rest the train split, visited
  in a seeded order reshuffled every pass (problem i of the train split: pass i // n, place i % n)."""
  if not cfg.dataset:
    raise ConfigError("config.grpo.task = lm.training.rewards.jsonl_problems needs config.grpo.dataset: a JSON Lines "
                      "file of {\"prompt\": ..., \"answer\": ...}.")
  try:
    rows = _problems(cfg.dataset)
  except OSError as e:
    raise ConfigError(f"config.grpo.dataset = {cfg.dataset!r} cannot be read: {e}") from e
  held, rest = rows[:cfg.eval_prompts], rows[cfg.eval_prompts:]
  if split == "eval":
    chosen = [held[int(i) % len(held)] for i in indices]
  else:
    if not rest:
      raise ConfigError(f"config.grpo.dataset = {cfg.dataset!r} has {len(rows)} problems, all of them held "
                        f"out for eval (config.grpo.eval_prompts = {cfg.eval_prompts}): add problems or "
                        "lower eval_prompts.")
    n = len(rest)
    chosen = [rest[np.random.default_rng([seed, int(i) // n]).permutation(n)[int(i) % n]] for i in indices]
  return [p for p, _ in chosen], [a for _, a in chosen]


# Grade-school word problems: (text with {a}, {b}, {c}, {name}; the answer; the operands' ranges).
_WORD_PROBLEMS = (
    ("{name} has {a} marbles and wins {b} more. How many marbles does {name} have now?",
     lambda a, b, c: a + b, (2, 60), (2, 40), (0, 0)),
    ("A box holds {a} pencils. {name} takes {b} of them. How many pencils are left in the box?",
     lambda a, b, c: a - b, (20, 90), (1, 19), (0, 0)),
    ("{name} reads {a} pages a day for {b} days. How many pages does {name} read in all?",
     lambda a, b, c: a * b, (2, 12), (2, 9), (0, 0)),
    ("A bakery has {a} cakes, sells {b} in the morning and bakes {c} more. How many cakes does it have now?",
     lambda a, b, c: a - b + c, (20, 60), (1, 19), (1, 30)),
    ("{name} buys {b} bags with {a} apples in each and eats {c}. How many apples are left?",
     lambda a, b, c: a * b - c, (3, 9), (2, 6), (1, 5)),
)
_NAMES = ("Ava", "Ben", "Maya", "Leo", "Sara", "Omar", "Lena", "Tom")


def _word_problem(rng: np.random.Generator) -> tuple[str, str]:
  text, answer, *ranges = _WORD_PROBLEMS[int(rng.integers(len(_WORD_PROBLEMS)))]
  a, b, c = (int(rng.integers(lo, hi + 1)) for lo, hi in ranges)
  return text.format(a=a, b=b, c=c, name=_NAMES[int(rng.integers(len(_NAMES)))]), str(answer(a, b, c))


def word_problems(seed: int, split: str, indices, cfg: GRPOConfig) -> tuple[list[str], list[str]]:
  """Grade-school word problems of one or two steps (+, -, x), generated offline: problem i of a split
  depends on (seed, split, i) alone. A problem belongs to one split only, by a hash of its text (1 in 8 to
  eval), so that no held-out problem is ever trained on. The answer is an integer; reward it with
  `last_number` (the model may reason before it)."""
  del cfg
  prompts, answers = [], []
  for i in indices:
    for attempt in range(1000):
      text, answer = _word_problem(np.random.default_rng([seed, _SPLITS[split], int(i), attempt]))
      if (split == "eval") == held_out_problem(text):
        break
    prompts.append(text)
    answers.append(answer)
  return prompts, answers


def held_out_problem(text: str) -> bool:
  """Whether a word problem is one of the eval split's: a hash of its text, 1 in 8."""
  return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") % 8 == 0


def last_number(completions: list[str], answers: list[str]) -> list[float]:
  """1 when the last number the completion writes is the answer (what it reasons before is free), else 0."""
  numbers = [re.findall(r"-?\d+", c.replace(",", "")) for c in completions]
  return [float(bool(n) and n[-1].lstrip("0") == a.lstrip("0")) for n, a in zip(numbers, answers)]


_TAGGED = re.compile(r"<answer>(.*?)</answer>|\\boxed\{([^{}]*)\}|####\s*([^\n]*)", re.DOTALL)


def tagged_answer(completions: list[str], answers: list[str]) -> list[float]:
  """1 when the completion's last tagged answer is the answer, else 0: the text of its last `<answer>...
  </answer>`, `\\boxed{...}` or `#### ...` (GSM8K's mark, to the end of its line), white space, commas and a
  final period ignored. For prompts (or a system prompt) that ask for the tag; what precedes it is free."""
  def value(text: str) -> str | None:
    tags = _TAGGED.findall(text)
    tagged = "".join(tags[-1]).replace(",", "").strip().rstrip(".").strip() if tags else ""
    return tagged or None
  return [float(value(c) == a.replace(",", "").strip()) for c, a in zip(completions, answers)]


def exact_answer(completions: list[str], answers: list[str]) -> list[float]:
  """1 when the completion is the answer (surrounding white space ignored), else 0."""
  return [float(c.strip() == a) for c, a in zip(completions, answers)]


def answer_format(completions: list[str], answers: list[str]) -> list[float]:
  """0.1 when the completion is a number alone (the answer's form), whatever its value: a small reward
  that teaches the format before the answers are right."""
  del answers
  return [0.1 * bool(re.fullmatch(r"\s*-?\d+\s*", c)) for c in completions]
