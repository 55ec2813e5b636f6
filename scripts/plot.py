"""Training curves of one or more runs in one PNG, read from their TensorBoard event files.

  python scripts/plot.py runs/default runs/bigger_batch --out=curves.png

Each RUN is a --workdir of main.py: its train/ and eval/ event files give train and eval loss, learning
rate, tokens/s, MFU and gradient norm against the optimizer step, and loss against tokens seen. One colour
per run, named by its directory; train solid, eval dashed. gs:// workdirs are read through TensorFlow's
file system layer, as TensorBoard reads them.
"""

from __future__ import annotations

import argparse
import os

# TensorBoard's event reader imports TensorFlow when it is installed; keep its start-up lines from
# burying the one line this script prints (the oneDNN notice ignores TF_CPP_MIN_LOG_LEVEL, and this
# script runs no TensorFlow math for oneDNN to change).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only: no display needed, and no GUI toolkit imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
from tensorboard.compat import tf  # noqa: E402  (real TensorFlow if installed: gs:// paths)
from tensorboard.util import tensor_util  # noqa: E402

COLLECTIONS = ("train", "eval")
Scalars = dict[str, dict[int, float]]  # tag -> {step: value}


class NoEventsError(ValueError):
  """A RUN directory without TensorBoard event files."""


def read_scalars(logdir: str) -> Scalars:
  """{tag: {step: value}} of one collection directory; a step written twice (a resumed run that
  repeats steps after a crash) keeps its last value."""
  keep_all = {event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0}
  accumulator = event_accumulator.EventAccumulator(logdir, size_guidance=keep_all)
  accumulator.Reload()
  tags = accumulator.Tags()
  out: Scalars = {}
  # CLU's SummaryWriter stores scalars as tensors; older writers used simple values.
  for tag in tags.get(event_accumulator.TENSORS, []):
    for event in accumulator.Tensors(tag):
      out.setdefault(tag, {})[event.step] = float(tensor_util.make_ndarray(event.tensor_proto))
  for tag in tags.get(event_accumulator.SCALARS, []):
    for event in accumulator.Scalars(tag):
      out.setdefault(tag, {})[event.step] = float(event.value)
  return out


def has_events(logdir: str) -> bool:
  return bool(tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*")))


def read_run(run: str) -> dict[str, Scalars]:
  """{"train": ..., "eval": ...} of one workdir; an error naming the run when it has no event files."""
  found = [c for c in COLLECTIONS if has_events(os.path.join(run, c))]
  if not found:
    raise NoEventsError(
        f"{run}: no TensorBoard event files (events.out.tfevents.*) in {os.path.join(run, 'train')} or "
        f"{os.path.join(run, 'eval')}. Pass the --workdir of a main.py run that has logged a step.")
  return {c: read_scalars(os.path.join(run, c)) if c in found else {} for c in COLLECTIONS}


def run_labels(runs: list[str]) -> list[str]:
  """Directory names, or the paths as given where two runs share a name."""
  names = [os.path.basename(os.path.normpath(r)) for r in runs]
  return [n if names.count(n) == 1 else os.path.normpath(r) for n, r in zip(names, runs)]


def series(scalars: Scalars, tag: str) -> tuple[np.ndarray, np.ndarray]:
  points = sorted(scalars.get(tag, {}).items())
  return np.array([s for s, _ in points], float), np.array([v for _, v in points], float)


def tokens_at(train: Scalars, steps: np.ndarray) -> np.ndarray:
  """Tokens seen at the given steps, from the train `tokens_seen` scalar (0 tokens at step 0, so that an
  eval before the first logged train step is placed right too)."""
  known_steps, tokens = series(train, "tokens_seen")
  return np.interp(steps, np.concatenate([[0.0], known_steps]), np.concatenate([[0.0], tokens]))


EVAL_STYLE = dict(linestyle="--", marker="o", markersize=4)


def loss_curves(against_tokens: bool):
  """Train (solid) and eval (dashed) loss against the step, or against the tokens seen."""
  def draw(ax, data, color) -> int:
    train = data["train"]
    if against_tokens and "tokens_seen" not in train:
      return 0
    drawn = 0
    for collection, style in (("train", {}), ("eval", EVAL_STYLE)):
      steps, loss = series(data[collection], "loss")
      if len(steps):
        ax.plot(tokens_at(train, steps) if against_tokens else steps, loss, color=color, **style)
        drawn = 1
    return drawn
  return draw


def train_curve(tag: str):
  """One train scalar against the step."""
  def draw(ax, data, color) -> int:
    steps, values = series(data["train"], tag)
    if len(steps):
      ax.plot(steps, values, color=color, marker="." if len(steps) < 30 else None)
    return int(len(steps) > 0)
  return draw


def plain_number(value, _position) -> str:
  """3e-3 as 0.003: SI prefixes ("3 m") read wrongly for a learning rate."""
  return f"{value:.3g}"


# (title, x label, draw function, y formatter factory: a formatter belongs to one axis)
PANELS = (
    ("Loss", "optimizer step", loss_curves(against_tokens=False), None),
    ("Learning rate", "optimizer step", train_curve("learning_rate"),
     lambda: ticker.FuncFormatter(plain_number)),
    ("Throughput (tokens/s, all devices)", "optimizer step", train_curve("tokens_per_sec"),
     ticker.EngFormatter),
    ("MFU", "optimizer step", train_curve("mfu"), lambda: ticker.PercentFormatter(xmax=1.0)),
    ("Gradient norm (before clipping)", "optimizer step", train_curve("grad_norm"), None),
    ("Loss against tokens seen", "tokens seen", loss_curves(against_tokens=True), None),
)


def plot(runs: list[str], out: str) -> dict[str, int]:
  """Writes the PNG; returns {panel title: runs drawn in it}."""
  data = [read_run(run) for run in runs]  # all errors before any drawing
  labels = run_labels(runs)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  fig, axes = plt.subplots(2, 3, figsize=(16, 9), layout="constrained")
  drawn = {}
  for ax, (title, xlabel, draw, formatter) in zip(axes.flat, PANELS):
    drawn[title] = sum(draw(ax, d, colors[i % len(colors)]) for i, d in enumerate(data))
    style_axes(ax, title, xlabel, formatter, empty=not drawn[title])
  add_legend(fig, labels, colors)
  directory = os.path.dirname(out)
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return drawn


def style_axes(ax, title: str, xlabel: str, formatter, empty: bool) -> None:
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.grid(True, alpha=0.3)
  if xlabel == "tokens seen":
    ax.xaxis.set_major_formatter(ticker.EngFormatter())
  else:
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  if formatter is not None:
    ax.yaxis.set_major_formatter(formatter())
  if empty:
    # Say why the panel is blank (e.g. MFU needs two logged steps: the first carries compilation).
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")


def add_legend(fig, labels: list[str], colors: list[str]) -> None:
  handles = [Line2D([], [], color=colors[i % len(colors)], linewidth=3, label=label)
             for i, label in enumerate(labels)]
  handles += [Line2D([], [], color="black", label="train"),
              Line2D([], [], color="black", label="eval", **EVAL_STYLE)]
  fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False)


def out_problem(out: str) -> str | None:
  """Why the PNG cannot be written at `out` (None when it can): a directory, or a path under a file."""
  if os.path.isdir(out):
    return f"--out={out} is a directory; name the PNG to write, e.g. --out={os.path.join(out, 'curves.png')}."
  existing = os.path.dirname(os.path.abspath(out))
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return (f"--out={out}: {existing} is a file, not a directory. Name a PNG in a directory (missing "
            "directories are created).")
  return None


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", metavar="RUN", help="a --workdir of main.py")
  parser.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
  args = parser.parse_args(argv)
  if problem := out_problem(args.out):
    parser.error(problem)  # exits with status 2, before any run is read
  try:
    drawn = plot(args.runs, args.out)
  except NoEventsError as e:
    parser.error(str(e))  # exits with status 2
  empty = [title for title, count in drawn.items() if not count]
  print(f"Wrote {args.out}: {len(args.runs)} run(s)" + (f"; no data for {', '.join(empty)}" if empty else ""))


if __name__ == "__main__":
  main()
