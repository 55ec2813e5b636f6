"""scripts/plan.py: the printed plan of a small config, and a suggestion when the step does not fit."""

import dataclasses
import importlib
import os
import subprocess
import sys

import jax
import pytest

from lm.config import from_config_dict
from tests.helpers import base_config, load_script, needs_cuda_plugin, needs_libtpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = os.path.join(ROOT, "scripts", "plan.py")
SMALL = ["--config.model.vocab_size=512", "--config.model.d_model=64", "--config.model.num_layers=2",
         "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
         "--config.model.mlp_dim=128", "--config.model.max_seq_len=64", "--config.train.seq_len=64",
         "--config.train.micro_batch_size=8", "--config.train.gradient_accumulation_steps=2"]


@pytest.fixture(scope="module")
def plan():
  """The script as a module: it leaves XLA_FLAGS alone when imported, so it sees conftest's 8 devices."""
  return load_script("plan")


def small_config():
  c = base_config()
  model = dataclasses.replace(c.model, vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=16, mlp_dim=128, max_seq_len=64)
  train = dataclasses.replace(c.train, seq_len=64, micro_batch_size=8, gradient_accumulation_steps=2)
  return dataclasses.replace(c, model=model, train=train)


@pytest.mark.slow  # 25-30 s
def test_prints_the_plan_for_the_devices_asked():
  # --devices=4 must reach XLA before jax starts (the environment says 8): the -1 data axis shows it.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, PLAN, f"--config={ROOT}/configs/default.py", *SMALL, "--devices=4",
                           "--device_kind=v5e", "--mfu=0.5"], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  for field in ("Mesh: data=4 x fsdp=1 x tensor=1", "micro_batch_size 8 x gradient_accumulation_steps 2 x 4 data-parallel devices = 64 sequences",
                "parameters", "optimizer state", "accumulator", "temporary", "of 16 GB", ": fits",
                "FLOPs per step", "At MFU 0.5 on 4 x 1.97e+14 FLOP/s: step time", "tokens/s", "HFU",
                "an estimate of GPU memory", "Model: 139,584 parameters",
                # 4 data-parallel replicas at accumulation 2: the gradient is all-reduced once per step.
                "Collectives per optimizer step and device: all-reduce 2 x"):
    assert field in out, (field, out)


@pytest.mark.slow  # ~24 s: the search compiles several candidates
def test_suggests_what_fits_when_the_memory_is_too_small(plan):
  config = small_config()
  full = plan.Estimator(jax.devices()[:8])(config)
  # Adam's two moments in float32 like the parameters (plus a few scalars); on data=8 each replica sums
  # its micro-batches locally (local accumulation): the state carries no accumulator.
  assert full.params > 0 and full.accumulator == 0
  without_local = plan.Estimator(jax.devices()[:8])(dataclasses.replace(
      config, train=dataclasses.replace(config.train, local_accumulation=False)))
  assert without_local.accumulator == full.params  # the scan's carry, in the state's donated buffer
  assert full.optimizer == pytest.approx(2 * full.params, abs=64)
  # A device with 80% of what the step needs (all of it usable): a smaller micro-batch must do.
  memory_gb = 0.8 * full.total / plan.GB
  target = plan.make_target("", 1, 8, "v5e", memory_gb)
  lines = plan.report(config, target, usable=1.0, mfu=0.4, hardware_flops=False)
  text = "\n".join(lines)
  assert "does NOT fit" in text and "Does not fit. Tried" in text, text
  suggestion = next(line for line in lines if line.startswith("Suggestion:"))
  assert "micro_batch_size=8 " not in suggestion and "remat=none" in suggestion, text
  assert "micro_batch_size=4 gradient_accumulation_steps=4" in suggestion, text  # same global batch
  assert "fits" in text.split("Suggestion:")[1]




def tpu_config(**train):
  """small_config at seq_len 128: splash attention's tiles are multiples of 128."""
  c = small_config()
  model = dataclasses.replace(c.model, max_seq_len=128)
  return dataclasses.replace(c, model=model, train=dataclasses.replace(c.train, seq_len=128, **train))


@needs_libtpu
def test_compiles_for_a_tpu_slice_with_splash_attention(plan):
  target = plan.make_target("v5e:2x4", 1, 0, "h100")
  assert target.platform == "tpu" and len(target.devices) == 8 and target.memory_gb == 16
  est = plan.Estimator(target.devices)(tpu_config())
  assert est.attention == "splash"  # auto, resolved for the slice's devices, not the CPU backend
  text = est.compiled.as_text()
  assert "tpu_custom_call" in text  # the Pallas kernel, compiled by XLA:TPU
  memory = est.compiled.memory_analysis()
  assert 0 < memory.temp_size_in_bytes < est.total < 0.1 * plan.GB
  # 8 data-parallel chips: the gradients are all-reduced once per optimizer step (local accumulation).
  collectives = plan.hlo.collectives(text)
  assert collectives["all-reduce"].count >= 1 and collectives["all-reduce"].bytes > 0
  lines = plan.describe(est, target.memory_gb, 0.9)
  assert any("of 16 GB" in line and ": fits" in line for line in lines), lines


def _plan_on_two_slices(*flags):
  result = subprocess.run([sys.executable, PLAN, f"--config={ROOT}/configs/default.py", *SMALL,
                           "--config.model.max_seq_len=128", "--config.train.seq_len=128",
                           "--topology=v5e:2x4", "--num_slices=2", *flags], capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Failed to find host bounds" not in result.stderr  # libtpu's start-up noise is silenced
  return result.stdout


@needs_libtpu
def test_plan_script_with_a_topology():
  out = _plan_on_two_slices("--hardware_flops=false")
  for field in ("Plan: v5e:2x4 x 2 slices: 16 x v5e (16 GB", "attention splash",
                "Mesh: data=16 x fsdp=1 x tensor=1",
                "Model: 139,584 parameters", "At MFU 0.4 on 16 x 1.97e+14 FLOP/s",
                "XLA:TPU's, from libtpu's compile"):
    assert field in out, (field, out)


@needs_libtpu
@pytest.mark.slow  # four more compiles (41 s)
def test_plan_script_with_a_topology_prints_the_roofline():
  out = _plan_on_two_slices()
  for field in ("Roofline per chip:", "GB accessed at 819 GB/s", "the splash kernels"):
    assert field in out, (field, out)


@needs_libtpu
@pytest.mark.parametrize("args,message", [
    (["--topology=v9:2x2"], "--topology=v9:2x2 (--num_slices=1): libtpu cannot make this slice"),
    (["--topology=v5e:2x4", "--config.mesh.tensor=3"], "config.mesh.data = -1 cannot fill 8 devices"),
    (["--topology=v5e:2x4", "--config.model.attention=cudnn"], "config.model.attention = cudnn runs on GPU only"),
    (["--topology=v5e:2x4", "--config.model.attention=splash", "--config.train.seq_len=48"],
     "needs config.train.seq_len to be a multiple of 128"),
])
def test_bad_tpu_plans_say_what_to_change(args, message):
  result = subprocess.run([sys.executable, PLAN, f"--config={ROOT}/configs/default.py", *SMALL, *args],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


@needs_libtpu
@pytest.mark.parametrize("name", ["llama_1_36b", "qwen3_1_8b", "gemma3_270m", "gemma3_1b", "gemma3_4b"])
def test_full_size_meshes_span_multi_host_slices_unchanged(name):
  """The hosts of one slice share its interconnect (one granule); several slices split the fsdp axis."""
  from lm.config import from_config_dict
  from lm.model import sharding
  from lm.tools import topology
  config = from_config_dict(importlib.import_module(f"configs.{name}").get_config())
  for slice_name, slices in (("v5e:2x4", 1), ("v5p:2x2x2", 1), ("v5e:2x4", 2)):
    devices = topology.devices(slice_name, slices)
    assert len({d.process_index for d in devices}) > 1  # several hosts
    mesh = sharding.make_mesh(config.mesh, devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": len(devices), "tensor": 1}
    sharding.check_divisible(config.model, dict(mesh.shape))


@pytest.mark.slow  # two compiles of llama_1_36b's layers at 8k for XLA:TPU, 2-3 minutes
@needs_libtpu
def test_micro_batches_run_one_after_another_on_the_chip(plan):
  """XLA:TPU holds one micro-batch's activations at a time: 2 layers of llama_1_36b at seq_len 8192 accumulating
  2 micro-batches of 1 peak near 1 micro-batch (2.42 against 2.34 GB of temporaries, libtpu 0.0.50.1), where
  the last micro-batch's forward pass, run beside the scan's, held two (3.88 GB): it waits for the scan (an
  optimization_barrier). Tiny models do not show it: their steps are scheduled in order anyway."""
  from configs import llama_1_36b
  c = from_config_dict(llama_1_36b.get_config())
  model = dataclasses.replace(c.model, num_layers=2, max_seq_len=8192, remat="save_dots", attention="splash")
  target = plan.make_target("v5e:2x4", 1, 0, "h100")
  temporaries = {}
  for k in (1, 2):
    train = dataclasses.replace(c.train, seq_len=8192, micro_batch_size=1, gradient_accumulation_steps=k)
    temporaries[k] = plan.Estimator(target.devices)(dataclasses.replace(c, model=model, train=train)).temporary
  assert temporaries[2] < 1.15 * temporaries[1], temporaries


@needs_libtpu
def test_a_step_larger_than_the_chip_is_measured_not_fatal(plan):
  """XLA:TPU refuses to compile a step over the chip's HBM; the planner reads what it needed from the
  refusal and counts it as not fitting (the search goes on)."""
  target = plan.make_target("v5e:2x4", 1, 0, "h100")
  est = plan.Estimator(target.devices)(tpu_config(micro_batch_size=32768))
  assert est.compiled is None and est.temporary > 16 * plan.GB and est.total > est.temporary
  assert any("does NOT fit" in line for line in plan.describe(est, target.memory_gb, 0.9))


GEMMA_LIKE = dict(sliding_window=32, local_layers_per_global=1, qk_norm=True, post_norms=True,
                  norm_unit_offset=True, mlp_activation="gelu_tanh", embed_scale=True)


@needs_cuda_plugin
@pytest.mark.parametrize("model", [{}, GEMMA_LIKE], ids=["llama", "gemma_windows"])
def test_compiles_for_a_gpu_machine_with_cudnn_attention(plan, model):
  """XLA:GPU compiles the step for 8 H100s without a GPU: bfloat16 resolves auto to cuDNN's flash attention,
  whose kernels (with the documents of a packed batch as a mask, and the sliding window of Gemma's local
  layers) are custom calls of the compiled step."""
  target = plan.make_target("h100:8", 1, 0, "v5e")
  assert target.platform == "gpu" and len(target.devices) == 8 and target.memory_gb == 80
  c = tpu_config()
  config = dataclasses.replace(c, model=dataclasses.replace(c.model, dtype="bfloat16", **model))
  est = plan.Estimator(target.devices)(config)
  assert est.attention == "cudnn"  # auto, resolved for the machine's GPUs, not the CPU backend
  text = est.compiled.as_text()
  assert text.count("__cudnn$fmha") >= 2  # forward and backward kernels
  assert 0 < est.compiled.memory_analysis().temp_size_in_bytes < est.total < 0.1 * plan.GB
  assert plan.hlo.collectives(text)["all-reduce"].bytes > 0  # 8 data-parallel GPUs


@needs_cuda_plugin
@pytest.mark.slow  # four more compiles (~40 s)
def test_gpu_flops_and_bytes_are_those_of_the_gpu_program(plan):
  """XLA:GPU compiled without a GPU has no cost analysis of its own: the CPU client's analysis counts its
  (GPU-fused) program, every layer and micro-batch extrapolated as on TPU."""
  target = plan.make_target("h100:8", 1, 0, "v5e")
  c = tpu_config()
  est = plan.Estimator(target.devices)(dataclasses.replace(c, model=dataclasses.replace(c.model, dtype="bfloat16")))
  flops = plan.flops_of(est, target.devices)
  assert 0.5 < flops.hardware / flops.model < 3 and flops.bytes_accessed > 0


@needs_cuda_plugin
def test_plan_script_for_two_gpu_hosts():
  result = subprocess.run([sys.executable, PLAN, f"--config={ROOT}/configs/default.py", *SMALL,
                           "--config.model.max_seq_len=128", "--config.train.seq_len=128",
                           "--config.model.dtype=bfloat16", "--topology=h100:2x8", "--hardware_flops=false"],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  for field in ("Plan: h100:2x8: 16 x H100 SXM (80 GB, 9.89e+14 bf16 FLOP/s", "attention cudnn",
                "Mesh: data=16 x fsdp=1 x tensor=1", "At MFU 0.4 on 16 x 9.89e+14 FLOP/s",
                "XLA:GPU's, from the CUDA plugin's compile"):
    assert field in result.stdout, (field, result.stdout)


@needs_cuda_plugin
@pytest.mark.parametrize("args,message", [
    (["--topology=h100:eight"], "--topology=h100:eight: a GPU machine is h100:GPUS (one host) or h100:HOSTSxGPUS"),
    (["--topology=h100:8", "--num_slices=2"], "GPU hosts are one network; give them in the topology (h100:2x8)"),
    (["--topology=h100:8", "--config.model.attention=splash"], "config.model.attention = splash runs on TPU only"),
])
def test_bad_gpu_plans_say_what_to_change(args, message):
  result = subprocess.run([sys.executable, PLAN, f"--config={ROOT}/configs/default.py", *SMALL, *args],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
