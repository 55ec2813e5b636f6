"""config.train.profile_steps: a jax.profiler trace of exactly the steps named, stopped on any exit."""

import collections
import glob
import gzip
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import base
from lm import console
from lm.config import from_config_dict, profile_step_range
from lm.errors import ConfigError
from lm.training import profiler
from tests.test_train import corpus, run_main  # noqa: F401

# The execution of the jitted train step (`jax.jit(functools.partial(train_step, ...))` in lm/training/runtime.py)
# on the host, once per call: the trace viewer's "CommonPjRtLoadedExecutable::Execute (jit_train_step)";
# each device's share of it carries a "[device] " prefix.
EXECUTE = re.compile(r"^\w+::Execute \(jit_train_step\)$")


def _session(workdir) -> str:
  """The one session directory the trace wrote."""
  sessions = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*"))
  assert len(sessions) == 1, sessions
  return sessions[0]


@pytest.mark.slow  # ~38 s: a main.py run with the profiler
def test_profile_steps_trace_the_train_step(tmp_path, corpus):
  workdir = tmp_path / "run"
  result = run_main(workdir, tmp_path / "data", corpus, "--config.train.num_train_steps=4",
                    "--config.train.profile_steps=2:4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Profiling steps 2 to 3" in result.stderr
  assert f"Profile written to {workdir}/profile" in result.stderr
  session = _session(workdir)
  xplane, = glob.glob(os.path.join(session, "*.xplane.pb"))
  with open(xplane, "rb") as f:
    assert b"jit_train_step" in f.read()
  trace, = glob.glob(os.path.join(session, "*.trace.json.gz"))
  with gzip.open(trace) as f:
    names = collections.Counter(event.get("name", "") for event in json.load(f)["traceEvents"])
  executions = sum(n for name, n in names.items() if EXECUTE.match(name))
  assert executions == 2, {name: n for name, n in names.items() if "train_step" in name}  # steps 2 and 3 of 4


@pytest.mark.parametrize("value,message", [
    ("10-13", "config.train.profile_steps = '10-13' is not START:END."),
    ("10:", "config.train.profile_steps = '10:' is not START:END."),
    ("-2:3", "steps are numbered from 1, as in the log; -2 is not a step."),
    ("0:3", "0 is not a step."),
    ("5:5", "START must be below END, which is excluded"),
    ("7:3", "START must be below END"),
])
def test_bad_profile_steps_name_the_key_and_the_fix(value, message):
  d = base.get_config().to_dict()
  d["train"]["profile_steps"] = value
  with pytest.raises(ConfigError) as e:
    from_config_dict(ml_collections.ConfigDict(d))
  assert message in str(e.value) and '"10:13" traces steps 10, 11 and 12' in str(e.value)


def test_profile_steps_are_a_slice_of_the_logged_steps():
  assert profile_step_range("") is None
  assert profile_step_range(" 10 : 13 ") == range(10, 13)
  c = base.get_config()
  c.train.profile_steps = "10:13"
  assert from_config_dict(c).train.profile_steps == "10:13"


@pytest.fixture
def warnings(caplog):
  console.logger.addHandler(caplog.handler)  # the `lm` logger does not propagate to the root
  yield caplog
  console.logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("steps,resumed,total,traced,warning", [
    (range(10, 13), 0, 100, range(10, 13), None),
    (range(10, 13), 0, 11, range(10, 12), "takes steps 1 to 11 (a fresh start): tracing steps 10 to 11"),
    (range(10, 13), 0, 5, range(0), "takes steps 1 to 5 (a fresh start): nothing is traced"),
    (range(10, 13), 10, 100, range(11, 13), "(resumed from step 10): tracing steps 11 to 12"),
    (range(10, 13), 12, 100, range(0), "(resumed from step 12): nothing is traced"),
    (None, 0, 100, range(0), None),
])
def test_steps_outside_the_run_are_skipped_with_a_warning(warnings, steps, resumed, total, traced, warning):
  assert list(profiler.steps_to_trace(steps, resumed, total)) == list(traced)
  if warning is None:
    assert not warnings.records
  else:
    assert warning in warnings.text


def test_the_trace_stops_when_the_loop_ends_early(tmp_path):
  step = jax.jit(lambda x: jnp.sin(x) * 2)
  x = step(jnp.ones(8))
  with pytest.raises(ZeroDivisionError):
    with profiler.StepProfile(range(1, 4), str(tmp_path)) as profile:
      for done in (1, 2):
        profile.before(done)
        x = step(x)
        profile.after(done, x)
      raise ZeroDivisionError  # step 2 of 1 to 3 fails
  assert glob.glob(os.path.join(_session(tmp_path), "*.xplane.pb"))
  jax.profiler.start_trace(str(tmp_path / "again"))  # raises if the first trace still ran
  jax.profiler.stop_trace()
