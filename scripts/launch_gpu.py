"""GPUs: one node with all its GPUs, or several nodes under SLURM (one process per node).

  python scripts/launch_gpu.py node  --config=configs/llama_1_36b.py --workdir=runs/llama [-- main.py flags]
  python scripts/launch_gpu.py slurm --nodes=4 --partition=gpu --time=24:00:00 \\
      --config=configs/llama_1_36b.py --workdir=/shared/runs/llama [-- main.py flags]

`node` runs main.py as one process that drives every GPU of the machine (no jax.distributed needed).
`slurm` writes a batch script (--script, default runs/<job>.sbatch) and submits it with sbatch: `srun`
starts one main.py per node, JAX finds the others from SLURM's variables, and each process keeps all the
GPUs of its node (JAX's default under SLURM is one GPU per process). The --workdir must be on a file
system that every node sees (or gs://): all processes write the checkpoints together. --dry_run prints the
script and the commands instead of running them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(args) -> list[str]:
  return [os.path.join(ROOT, ".venv", "bin", "python"), os.path.join(ROOT, "main.py"),
          f"--config={args.config}", f"--workdir={args.workdir}", *args.overrides]


def sbatch_script(args) -> str:
  """One task per node with all its GPUs; srun ends every task when one fails (no hang on a dead node)."""
  directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1",
                f"--gpus-per-node={args.gpus_per_node}", f"--time={args.time}",
                f"--output={os.path.join(ROOT, 'runs', '%x-%j.out')}"]
  directives += [f"--partition={args.partition}"] if args.partition else []
  directives += [f"--account={args.account}"] if args.account else []
  gpus = ",".join(str(i) for i in range(args.gpus_per_node))
  return "\n".join([
      "#!/bin/bash",
      *(f"#SBATCH {d}" for d in directives),
      "set -euo pipefail",
      f"cd {shlex.quote(ROOT)}",
      "# jax.distributed.initialize() reads the cluster from SLURM; keep every GPU of the node in its process.",
      f"export JAX_LOCAL_DEVICE_IDS={gpus}",
      f"srun --kill-on-bad-exit=1 {shlex.join(main_command(args))}",
      "",
  ])


def commands(args) -> list[list[str]]:
  if args.action == "node":
    return [main_command(args)]
  return [["sbatch", args.script]]


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("action", choices=("node", "slurm"))
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "llama_1_36b.py"), help="config file")
  parser.add_argument("--workdir", required=True, help="checkpoints and TensorBoard; shared by all nodes")
  parser.add_argument("--nodes", type=int, default=2, help="slurm: nodes, one process each")
  parser.add_argument("--gpus_per_node", type=int, default=8, help="slurm: GPUs of each node")
  parser.add_argument("--partition", default="", help="slurm: partition; default: the cluster's")
  parser.add_argument("--account", default="", help="slurm: account to charge")
  parser.add_argument("--time", default="24:00:00", help="slurm: time limit")
  parser.add_argument("--job_name", default="lm", help="slurm: job name")
  parser.add_argument("--script", default="", help="slurm: where to write the batch script")
  parser.add_argument("--dry_run", action="store_true", help="print, run nothing")
  split = argv.index("--") if "--" in argv else len(argv)  # after `--`: more main.py flags
  args = parser.parse_args(argv[:split])
  args.overrides = argv[split + 1:]
  if args.nodes < 1 or args.gpus_per_node < 1:
    parser.error(f"--nodes={args.nodes} and --gpus_per_node={args.gpus_per_node} must be >= 1")
  args.script = args.script or os.path.join(ROOT, "runs", f"{args.job_name}.sbatch")
  # The batch script runs from the checkout: paths typed relative to here must not change meaning.
  args.config = os.path.abspath(args.config)
  args.workdir = args.workdir if "://" in args.workdir else os.path.abspath(args.workdir)
  return args


def main(argv: list[str]) -> None:
  args = parse(argv)
  if args.action == "slurm":
    script = sbatch_script(args)
    if args.dry_run:
      print(script)
    else:
      for directory in (os.path.dirname(os.path.abspath(args.script)), os.path.join(ROOT, "runs")):
        os.makedirs(directory, exist_ok=True)  # SLURM does not create the --output directory
      with open(args.script, "w") as f:
        f.write(script)
  for command in commands(args):
    print(shlex.join(command), flush=True)
    if not args.dry_run:
      subprocess.run(command, check=True)


if __name__ == "__main__":
  main(sys.argv[1:])
