"""Cloud TPU VM slices: create one, put this code on every worker, train on all of them, delete it.

  python scripts/launch_tpu.py create --name=lm-v5p --zone=us-east5-a --accelerator=v5p-32 [--spot]
  python scripts/launch_tpu.py setup  --name=lm-v5p --zone=us-east5-a
  python scripts/launch_tpu.py train  --name=lm-v5p --zone=us-east5-a --config=configs/llama_1_36b.py \\
      --workdir=gs://BUCKET/llama_1_36b [-- --config.train.micro_batch_size=4 ...]
  python scripts/launch_tpu.py delete --name=lm-v5p --zone=us-east5-a

Every command runs gcloud (the Cloud SDK, logged in, project set or --project); --dry_run prints the
commands instead. `train` runs the same main.py on every worker at once (`--worker=all`): JAX finds the
other hosts of the slice by itself, each reads its own share of every batch, and checkpoints and TensorBoard
events go to the gs:// --workdir that all workers share. The data is prepared on each worker's own disk.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The TPU software version for JAX by generation (cloud.google.com/tpu/docs/runtimes), keyed by the
# prefix of the accelerator type: v5litepod-16 is a v5e slice of 16 chips, v5p-32 has 16 chips (32 cores).
RUNTIMES = {"v6e": "v2-alpha-tpuv6e", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
            "v4": "tpu-ubuntu2204-base"}
REMOTE_DIR = "lm"  # in the home directory of every worker
# TPU images ship an older Python; uv provides 3.12 where it is missing (scripts/install.sh takes $PYTHON).
INSTALL = ("{ command -v python3.12 >/dev/null || { curl -LsSf https://astral.sh/uv/install.sh | sh && "
           "~/.local/bin/uv python install 3.12; }; } && "
           "PYTHON=$(command -v python3.12 || ~/.local/bin/uv python find 3.12) bash scripts/install.sh && "
           ".venv/bin/pip install --quiet -U 'jax[tpu]'")


def runtime_version(accelerator: str) -> str:
  family = accelerator.rsplit("-", 1)[0]
  if family not in RUNTIMES:
    raise SystemExit(f"--accelerator={accelerator!r}: unknown TPU type; use v5litepod-N, v5p-N, v6e-N or "
                     "v4-N, or give --version (the TPU software version) yourself.")
  return RUNTIMES[family]


def _gcloud(args, verb: str, *words: str) -> list[str]:
  """`gcloud compute tpus tpu-vm VERB WORDS... --zone=... [--project=...]`."""
  command = ["gcloud", "compute", "tpus", "tpu-vm", verb, *words, f"--zone={args.zone}"]
  return command + ([f"--project={args.project}"] if args.project else [])


def _on_all_workers(args, remote: str) -> list[str]:
  return _gcloud(args, "ssh", args.name, "--worker=all", f"--command={remote}")


def commands(args) -> list[list[str]]:
  """The gcloud command lines of one action, in order."""
  if args.action == "create":
    version = args.version or runtime_version(args.accelerator)
    return [_gcloud(args, "create", args.name, f"--accelerator-type={args.accelerator}", f"--version={version}",
                    *(["--spot"] if args.spot else []))]
  if args.action == "delete":
    return [_gcloud(args, "delete", args.name, "--quiet")]
  if args.action == "setup":
    install = f"cd ~/{REMOTE_DIR} && {INSTALL}"
    if args.repo:  # every worker clones the same commit
      fetch = (f"rm -rf ~/{REMOTE_DIR} && git clone --depth=1 --branch={shlex.quote(args.branch)} "
               f"{shlex.quote(args.repo)} ~/{REMOTE_DIR}")
      return [_on_all_workers(args, f"{fetch} && {install}")]
    # This checkout's committed files (no .venv, no runs/), copied to every worker.
    archive = "/tmp/lm_code.tar.gz"
    return [["git", "-C", ROOT, "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
            _gcloud(args, "scp", archive, f"{args.name}:{archive}", "--worker=all"),
            _on_all_workers(args, f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && "
                                  f"tar -xzf {archive} -C ~/{REMOTE_DIR} && {install}")]
  if args.action == "train":
    if not args.workdir.startswith("gs://"):
      raise SystemExit(f"--workdir={args.workdir!r}: the workers of a slice share no disk, and all of them "
                       "write the checkpoints together; use a gs://BUCKET/RUN directory.")
    main = [".venv/bin/python", "main.py", f"--config={args.config}", f"--workdir={args.workdir}",
            *args.overrides]
    run = shlex.join(main)
    if args.background:  # survives the ssh session; follow it with `tail -f ~/lm/train.log` on worker 0
      run = f"nohup {run} > train.log 2>&1 &"
    return [_on_all_workers(args, f"cd ~/{REMOTE_DIR} && {run}")]
  raise SystemExit(f"unknown action {args.action!r}")


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("action", choices=("create", "setup", "train", "delete"))
  parser.add_argument("--name", required=True, help="TPU name")
  parser.add_argument("--zone", required=True, help="zone with capacity for the accelerator, e.g. us-east5-a")
  parser.add_argument("--project", default="", help="Google Cloud project; default: gcloud's own")
  parser.add_argument("--accelerator", default="", help="create: v5litepod-16, v5p-32, v6e-16, ...")
  parser.add_argument("--version", default="", help="create: TPU software version; default by type")
  parser.add_argument("--spot", action="store_true", help="create: a Spot TPU (preemptible, cheaper)")
  parser.add_argument("--repo", default="", help="setup: a git URL to clone; default: copy this checkout")
  parser.add_argument("--branch", default="main", help="setup: branch or tag of --repo")
  parser.add_argument("--config", default="configs/llama_1_36b.py", help="train: config file")
  parser.add_argument("--workdir", default="", help="train: gs://BUCKET/RUN for checkpoints and TensorBoard")
  parser.add_argument("--background", action="store_true", help="train: keep running after ssh ends")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  # After `--`: more main.py flags for train (argparse would not take them after a positional).
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:split])
  args.overrides = argv[split + 1:]
  if args.action == "create" and not args.accelerator:
    parser.error("create needs --accelerator (e.g. v5p-32)")
  if args.action == "train" and not args.workdir:
    parser.error("train needs --workdir=gs://BUCKET/RUN")
  if args.overrides and args.action != "train":
    parser.error(f"extra arguments {args.overrides} are main.py flags: only train takes them")
  return args


def main(argv: list[str]) -> None:
  args = parse(argv)
  for command in commands(args):
    print(shlex.join(command), flush=True)
    if not args.dry_run:
      subprocess.run(command, check=True)


if __name__ == "__main__":
  main(sys.argv[1:])
