"""Several processes on one machine: 2 processes x 4 simulated CPU devices on 127.0.0.1 (gloo collectives)
train with accumulation, get killed, resume, and log the losses of 1 process x 8 devices; GRPO logs the rewards
and losses of 1 process; a bad launch stops within a bounded time with a message instead of hanging."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from lm import distributed
from lm.config import from_config_dict
from lm.errors import ConfigError
from lm.training import metrics
from lm.training.train import train_and_evaluate
from tests import test_loop
from tests.test_faults import _complete, _config, _wait
from tests.helpers import FAST_COMPILE
from tests.test_train import MAIN_ENV, ROOT, corpus, main_command  # noqa: F401 (corpus: a fixture)

# Eval only at the end; a given peak FLOP/s skips the CPU matmul probe (seconds on a shared machine).
TRAIN = dict(num_train_steps=5, save_interval_steps=2, eval_interval_steps=5, peak_flops_per_device=1e9)
STEPS = [f"--config.train.{key}={value}" for key, value in TRAIN.items()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp_path, name, argv_of, devices=(4, 4)) -> list[tuple[subprocess.Popen, str]]:
  """One main.py per entry of `devices` (its simulated CPU devices), stderr to a file each."""
  started = []
  for process_id, count in enumerate(devices):
    log = str(tmp_path / f"{name}.{process_id}.log")
    env = dict(MAIN_ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count={count} {FAST_COMPILE}")
    with open(log, "w") as f:
      started.append((subprocess.Popen(argv_of(process_id), cwd=ROOT, env=env, stdout=f, stderr=f), log))
  return started


def _finish(started, timeout=300) -> list[tuple[int, str]]:
  return [(p.wait(timeout=timeout), open(log).read()) for p, log in started]


def _flags(port, num_processes, process_id) -> list[str]:
  return [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
          f"--process_id={process_id}"]


def test_two_processes_resume_and_log_the_losses_of_one(tmp_path, corpus):
  data_dir = tmp_path / "data"
  # The reference: the same config on 1 process x the 8 devices of this test process.
  reference = str(tmp_path / "one_process")
  train_and_evaluate(from_config_dict(_config(tmp_path, corpus, **TRAIN)), reference)
  expected, expected_eval = metrics.read_jsonl(reference), metrics.read_jsonl(reference, "eval")

  workdir = tmp_path / "two_processes"
  argv = lambda port: lambda i: main_command(workdir, data_dir, corpus, *STEPS, *_flags(port, 2, i))
  first = _launch(tmp_path, "first", argv(_free_port()))
  _wait(first[0][0], lambda: 2 in _complete(workdir) and 3 in _logged(workdir), "checkpoint 2 and step 3")
  for process, _ in first:
    process.send_signal(signal.SIGKILL)
  _finish(first)
  newest = max(_complete(workdir))
  assert newest < 5  # a kill meant mid-run
  resumed = _finish(_launch(tmp_path, "resumed", argv(_free_port())))
  assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:] + resumed[1][1][-3000:]
  log, other_log = resumed[0][1], resumed[1][1]
  assert "Processes: 2, --coordinator_address=127.0.0.1" in log and f"resumed from step {newest}" in log
  assert "Mesh:                 data=4 x fsdp=2 x tensor=1 (across processes: data=2 x fsdp=1 x tensor=1)" in log
  assert "Rows per process:     8 of the 16 of each micro-batch" in log
  assert "step 5/5 | loss" in log and "step 5/5" not in other_log and "Model:" not in other_log

  # One writer: the first launch's steps, then the resumed run's, each once.
  train = [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["collection"] == "train"]
  cut = next(i for i in range(1, len(train)) if train[i]["step"] <= train[i - 1]["step"])
  assert [r["step"] for r in train[:cut]] == list(range(1, cut + 1)) and cut > newest
  assert [r["step"] for r in train[cut:]] == list(range(newest + 1, 6))
  # Exact resume: a step logged before the kill and again after it is the same to the bit.
  again = {r["step"]: r["loss"] for r in train[cut:]}
  assert all(r["loss"] == again[r["step"]] for r in train[:cut] if r["step"] in again)
  # Against one process: the same tokens and parameters at step 1, so the same loss to the bit; then the
  # gradient all-reduce across processes (gloo) adds in another order than within one process: measured
  # 1.2e-8 relative by step 6 (a 6-step run), well inside the 1e-6 that docs/determinism.md holds splits to.
  assert train[0]["loss"] == expected[1]["loss"]
  for r in train[cut:]:
    assert abs(r["loss"] - expected[r["step"]]["loss"]) <= 1e-6 * expected[r["step"]]["loss"], r["step"]
  eval_loss = metrics.read_jsonl(str(workdir), "eval")[5]["loss"]
  assert abs(eval_loss - expected_eval[5]["loss"]) <= 1e-6 * expected_eval[5]["loss"]
  assert expected[5]["loss"] < expected[1]["loss"]  # it trained: equal losses are not trivially equal
  assert sorted(_complete(workdir)) == [2, 4, 5]


# GRPO (tests/test_loop.py's tiny run): 32 completions a step, 8 prompts x 4; each process holds 8 of the 16 rows
# of each micro-batch, so it samples and rewards 4 prompts of a step. 6 eval prompts: 8 rows, 2 of them padding.
GRPO = [*test_loop.GRPO, "--config.grpo.eval_prompts=6", "--config.train.num_train_steps=3",
        "--config.train.save_interval_steps=3", "--config.train.eval_interval_steps=3",
        "--config.train.peak_flops_per_device=1e9"]


def test_grpo_on_two_processes_logs_the_figures_of_one(tmp_path, corpus):
  """Each process samples its own prompts' completions in one sampler batch of all rows: every row gets the
  random draws it gets in one process, so the completions and rewards are the same to the bit; the update
  sums over the processes (the loss in its last bits). The eval's greedy completions are split the same way."""
  data_dir = tmp_path / "data"
  one, two = tmp_path / "one", tmp_path / "two"
  port = _free_port()
  started = _launch(tmp_path, "one", lambda i: main_command(one, data_dir, corpus, *GRPO), devices=(8,))
  started += _launch(tmp_path, "two", lambda i: main_command(two, data_dir, corpus, *GRPO, *_flags(port, 2, i)))
  results = _finish(started)
  assert [code for code, _ in results] == [0, 0, 0], "\n".join(log[-3000:] for _, log in results)
  log = results[1][1]
  assert "eval: 6 held-out prompts" in log
  assert "Sampling:             each process samples and rewards the 4 prompts of its 16 rows" in log
  expected, logged = metrics.read_jsonl(str(one)), metrics.read_jsonl(str(two))
  assert sorted(logged) == [1, 2, 3]
  exact = ("reward_mean", "reward_std", "completion_length", "finished", "flat_groups", "reward/exact_answer",
           "reward/_parity_reward")
  for step, row in expected.items():
    assert {k: logged[step][k] for k in exact} == {k: row[k] for k in exact}, step
    for figure in ("loss", "kl", "grad_norm"):
      assert logged[step][figure] == pytest.approx(row[figure], rel=1e-5, abs=1e-9), (step, figure)
  assert metrics.read_jsonl(str(two), "eval") == metrics.read_jsonl(str(one), "eval")
  assert len({row["reward_mean"] for row in expected.values()}) > 1  # the runs sampled, not a constant


def test_grpo_stops_at_startup_when_a_group_would_span_two_processes(tmp_path, corpus):
  """16 generations a prompt, 8 rows a micro-batch on each process: every process says so, and the fix."""
  port = _free_port()
  results, seconds = _start_only(tmp_path, "groups", corpus,
                                 lambda i: [*GRPO, "--config.grpo.num_generations=16", *_flags(port, 2, i)])
  for code, log in results:
    assert code == 2 and "config.grpo.num_generations = 16: the completions of prompt 0 of a step would be sampled " \
                          "on two processes (each holds 8 of the 16 rows" in log, log[-2000:]
    assert "set config.train.micro_batch_size to a multiple of 4" in log and "Traceback" not in log
  assert seconds < 60


def _logged(workdir) -> set[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  return set(metrics.read_jsonl(str(workdir))) if os.path.exists(path) else set()


def _start_only(tmp_path, name, corpus, flags_of, devices=(4, 4)):
  """Bad launches: they must stop at startup, before the data or a checkpoint."""
  argv = lambda i: main_command(tmp_path / "run", tmp_path / "data", corpus, *flags_of(i))
  start = time.time()
  results = _finish(_launch(tmp_path, name, argv, devices), timeout=120)
  return results, time.time() - start


def test_unreachable_coordinator_is_an_error_within_the_timeout(tmp_path, corpus):
  port = _free_port()  # nobody listens there
  results, seconds = _start_only(tmp_path, "alone", corpus,
                                 lambda i: [*_flags(port, 2, 1), "--distributed_timeout=3"], devices=(4,))
  (code, log), = results
  assert code == 2 and seconds < 60, log[-2000:]
  assert "process 1 of 2" in log and "not all processes joined within 3 s" in log
  assert f"The coordinator 127.0.0.1:{port} cannot be reached from here" in log


_GONE_AFTER_JOINING = """
import os, signal, sys
from lm import distributed
distributed.initialize(distributed.Launch("flags", sys.argv[1], 2, int(sys.argv[2])), 60)
if sys.argv[2] == "1":
  os.kill(os.getpid(), signal.SIGKILL)  # gone without JAX's shutdown
import time; time.sleep(3)
distributed.exit_with(2, grace_seconds=5)
"""


def test_an_error_exit_does_not_wait_for_a_process_that_is_gone():
  """JAX's shutdown at exit waits for every process (measured: ~100 s, then a fatal abort) when one died."""
  address = f"127.0.0.1:{_free_port()}"
  started = time.time()
  processes = [subprocess.Popen([sys.executable, "-c", _GONE_AFTER_JOINING, address, str(i)], cwd=ROOT,
                                env=MAIN_ENV, stderr=subprocess.PIPE, text=True) for i in range(2)]
  (code, log), (other, _) = [(p.wait(timeout=120), p.stderr.read()) for p in processes]
  assert other == -signal.SIGKILL and code == 2, log[-2000:]
  assert "did not shut down within 5 s; exiting with 2" in log and time.time() - started < 60


@pytest.mark.parametrize("case,devices,num_processes,message", [
    ("count", (4, 4), (2, 3), "The processes were started with different --num_processes: [2, 3]"),
    ("devices", (4, 2), (2, 2), "The processes have different devices (process 0: 4, process 1: 2"),
])
def test_mismatched_processes_stop_every_process(tmp_path, corpus, case, devices, num_processes, message):
  port = _free_port()
  results, seconds = _start_only(tmp_path, case, corpus,
                                 lambda i: [*_flags(port, num_processes[i], i), "--distributed_timeout=60"],
                                 devices)
  for code, log in results:
    assert code == 2 and message in log, log[-2000:]
    assert "Traceback" not in log
  assert seconds < 60


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("flags,environ,expected", [
    ((None, None, None), {}, None),
    ((None, 1, None), SLURM, None),  # --num_processes=1 runs alone anywhere
    (("10.0.0.2:8476", 4, 3), SLURM, distributed.Launch("flags", "10.0.0.2:8476", 4, 3)),
    ((None, None, None), SLURM, distributed.Launch("SLURM, 2 tasks")),
    ((None, None, None), {**SLURM, "SLURM_NTASKS": "1"}, None),
    ((None, None, None), {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, None),  # not srun
    ((None, None, None), {"OMPI_COMM_WORLD_SIZE": "8"}, distributed.Launch("Open MPI, 8 ranks")),
    ((None, None, None), {"TPU_WORKER_HOSTNAMES": "w-0,w-1"}, distributed.Launch("Cloud TPU")),
])
def test_detect(flags, environ, expected):
  assert distributed.detect(*flags, environ=environ) == expected


@pytest.mark.parametrize("flags,message", [
    (("10.0.0.2:8476", None, None), "--num_processes and --process_id missing"),
    ((None, 2, 0), "--coordinator_address missing"),
    (("10.0.0.2:8476", 2, 2), "--process_id=2 with --num_processes=2"),
    (("10.0.0.2", 2, 0), "must be host:port"),
])
def test_detect_rejects_partial_or_wrong_flags(flags, message):
  with pytest.raises(ConfigError, match=message):
    distributed.detect(*flags, environ={})
