"""scripts/launch_tpu.py and scripts/launch_gpu.py: the command lines and batch script they build, and
their argument errors. Nothing is run: gcloud, sbatch and srun are not on this machine."""

import os
import shlex
import subprocess
import sys

import pytest

from tests.helpers import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


tpu, gpu = load_script("launch_tpu"), load_script("launch_gpu")


def _tpu(*argv):
  return tpu.commands(tpu.parse(list(argv)))


def _remote(command: list[str]) -> list[str]:
  """The words of the shell command that `gcloud ... ssh --command=...` runs on every worker."""
  (remote,) = [word.removeprefix("--command=") for word in command if word.startswith("--command=")]
  return shlex.split(remote)


@pytest.mark.parametrize("accelerator,version", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-32", "v2-alpha-tpuv5"), ("v6e-64", "v2-alpha-tpuv6e")])
def test_tpu_create_picks_the_software_version(accelerator, version):
  (command,) = _tpu("create", "--name=lm", "--zone=us-east5-a", f"--accelerator={accelerator}", "--spot",
                    "--project=p")
  assert command == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lm", f"--accelerator-type={accelerator}",
                     f"--version={version}", "--spot", "--zone=us-east5-a", "--project=p"]


def test_tpu_train_runs_main_on_every_worker():
  (command,) = _tpu("train", "--name=lm", "--zone=z", "--config=configs/llama_1_36b.py",
                    "--workdir=gs://bucket/run", "--", "--config.train.micro_batch_size=4",
                    "--config.data.sources.main.path=a b/*.txt")
  assert command[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lm", "--worker=all"]
  assert command[-1] == "--zone=z"
  # The overrides survive the remote shell word for word, spaces and globs included.
  assert _remote(command) == ["cd", "~/lm", "&&", ".venv/bin/python", "main.py",
                              "--config=configs/llama_1_36b.py", "--workdir=gs://bucket/run",
                              "--config.train.micro_batch_size=4", "--config.data.sources.main.path=a b/*.txt"]
  (background,) = _tpu("train", "--name=lm", "--zone=z", "--workdir=gs://b/r", "--background")
  assert _remote(background)[3] == "nohup" and _remote(background)[-4:] == [">", "train.log", "2>&1", "&"]


def test_tpu_setup_copies_the_checkout_or_clones():
  archive, copy, install = _tpu("setup", "--name=lm", "--zone=z")
  assert archive[:2] == ["git", "-C"] and "archive" in archive
  assert copy[4:7] == ["scp", "/tmp/lm_code.tar.gz", "lm:/tmp/lm_code.tar.gz"] and "--worker=all" in copy
  words = _remote(install)
  assert "tar" in words and "scripts/install.sh" in words and "jax[tpu]" in words
  (clone,) = _tpu("setup", "--name=lm", "--zone=z", "--repo=https://example.com/lm.git", "--branch=v1")
  assert _remote(clone)[4:9] == ["git", "clone", "--depth=1", "--branch=v1", "https://example.com/lm.git"]
  # The remote command is one valid shell command line.
  subprocess.run(["bash", "-n", "-c", install[-2].removeprefix("--command=")], check=True)


@pytest.mark.parametrize("argv,message", [
    (["train", "--name=lm", "--zone=z", "--workdir=runs/x"], "share no disk"),
    (["create", "--name=lm", "--zone=z", "--accelerator=v9x-8"], "unknown TPU type"),
])
def test_tpu_rejects_what_cannot_work(argv, message):
  with pytest.raises(SystemExit, match=message):
    _tpu(*argv)


@pytest.mark.parametrize("argv,message", [
    (["create", "--name=lm", "--zone=z"], "create needs --accelerator"),
    (["train", "--name=lm", "--zone=z"], "train needs --workdir"),
    (["delete", "--name=lm", "--zone=z", "--", "--config.train.seed=1"], "only train takes them"),
    (["delete", "--zone=z"], "--name"),
])
def test_tpu_argument_errors(argv, message):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "launch_tpu.py"), *argv, "--dry_run"],
                          capture_output=True, text=True)
  assert result.returncode == 2 and message in result.stderr


def test_tpu_dry_run_prints_and_runs_nothing():
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "launch_tpu.py"), "delete",
                           "--name=lm", "--zone=z", "--dry_run"], capture_output=True, text=True, check=True)
  assert result.stdout == "gcloud compute tpus tpu-vm delete lm --quiet --zone=z\n"


def test_slurm_script_runs_one_process_per_node_with_all_its_gpus(tmp_path):
  args = gpu.parse(["slurm", "--nodes=4", "--gpus_per_node=8", "--partition=gpu", "--account=a",
                    "--time=2:00:00", f"--workdir={tmp_path}/run", "--", "--config.train.micro_batch_size=4"])
  script = gpu.sbatch_script(args)
  lines = script.splitlines()
  assert lines[0] == "#!/bin/bash"
  for directive in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
                    "--account=a", "--time=2:00:00"):
    assert f"#SBATCH {directive}" in lines
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
  (srun,) = [shlex.split(line) for line in lines if line.startswith("srun ")]
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
  assert srun[3:] == [os.path.join(ROOT, "main.py"), f"--config={ROOT}/configs/llama_1_36b.py",
                      f"--workdir={tmp_path}/run", "--config.train.micro_batch_size=4"]
  subprocess.run(["bash", "-n"], input=script, text=True, check=True)
  assert gpu.commands(args) == [["sbatch", os.path.join(ROOT, "runs", "lm.sbatch")]]


def test_one_gpu_node_is_one_process(tmp_path):
  args = gpu.parse(["node", "--config=configs/default.py", "--workdir=gs://b/r"])
  assert gpu.commands(args) == [[os.path.join(ROOT, ".venv", "bin", "python"), os.path.join(ROOT, "main.py"),
                                 f"--config={os.path.abspath('configs/default.py')}", "--workdir=gs://b/r"]]
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "launch_gpu.py"), "slurm",
                           "--nodes=0", f"--workdir={tmp_path}"], capture_output=True, text=True)
  assert result.returncode == 2 and "--nodes=0" in result.stderr
