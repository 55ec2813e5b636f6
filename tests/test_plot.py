"""scripts/plot.py on a short real run of main.py: a readable PNG, and a clear error without event files."""

import os
import shutil

import numpy as np
import pytest
from matplotlib import image

from tests.helpers import load_script
from tests.test_train import ROOT, corpus, run_main  # noqa: F401  (corpus is a fixture used below)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plot():
  return load_script("plot")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
  """Two workdirs: 3 steps of the tiny model (eval at 2 and 3), and a copy under another name."""
  root = tmp_path_factory.mktemp("plot")
  first = root / "tiny_run"
  # A given peak skips the CPU matmul probe; a checkpoint only at the end.
  result = run_main(first, root / "data", corpus, "--config.train.num_train_steps=3",
                    "--config.train.save_interval_steps=100", "--config.train.peak_flops_per_device=1e10")
  assert result.returncode == 0, result.stderr[-3000:]
  second = root / "copy_run"
  shutil.copytree(first, second, ignore=shutil.ignore_patterns("checkpoints"))
  return [str(first), str(second)]


def test_plot_draws_every_panel_for_every_run(plot, runs, tmp_path):
  out = tmp_path / "figures" / "curves.png"
  drawn = plot.plot(runs, str(out))
  assert drawn == {title: 2 for title, *_ in plot.PANELS}
  with open(out, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  assert 30_000 < os.path.getsize(out) < 2_000_000
  pixels = image.imread(out)[..., :3]
  assert pixels.shape == (900, 1600, 3)
  # Not blank: six panels of curves, ticks and text leave a fair share of pixels off-white.
  assert pixels.std() > 0.05 and (pixels.mean(axis=-1) < 0.9).mean() > 0.02


def test_read_run_gives_the_logged_steps(plot, runs):
  data = plot.read_run(runs[0])
  assert sorted(data["train"]["loss"]) == [1, 2, 3]
  assert sorted(data["train"]["mfu"]) == [2, 3]  # step 1 carries compilation
  assert sorted(data["eval"]["loss"]) == [2, 3]
  tokens = plot.tokens_at(data["train"], np.array([2.0, 3.0]))
  assert list(tokens) == [data["train"]["tokens_seen"][2], data["train"]["tokens_seen"][3]]


def test_run_labels_are_directory_names_unless_they_clash(plot):
  assert plot.run_labels(["runs/a", "runs/b/"]) == ["a", "b"]
  assert plot.run_labels(["x/run", "y/run"]) == ["x/run", "y/run"]


def test_a_run_without_event_files_is_a_usage_error(plot, runs, tmp_path, capsys):
  empty = tmp_path / "not_a_run"
  empty.mkdir()
  with pytest.raises(SystemExit) as e:
    plot.main([runs[0], str(empty), f"--out={tmp_path / 'x.png'}"])
  assert e.value.code == 2
  error = capsys.readouterr().err
  assert f"{empty}: no TensorBoard event files" in error and "train" in error and "eval" in error
  assert not (tmp_path / "x.png").exists()


def test_an_out_path_that_cannot_be_a_file_is_a_usage_error(plot, tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  for out, message in ((tmp_path / "a_file" / "curves.png", f"{tmp_path / 'a_file'} is a file, not a directory"),
                       (tmp_path, f"--out={tmp_path} is a directory; name the PNG to write")):
    with pytest.raises(SystemExit) as e:  # checked before any run is read: this one does not exist
      plot.main([str(tmp_path / "no_run"), f"--out={out}"])
    assert e.value.code == 2 and message in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["a_file"]
