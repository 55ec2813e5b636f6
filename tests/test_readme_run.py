"""The README's default run, trained again from scratch (scripts/reproduce_readme.py): its quoted losses,
digit for digit, with the locked environment. Five minutes on 2 cores: under -m slow, and run by
scripts/lock.sh whenever the locks change."""

import os
import subprocess
import sys

import pytest

from tests.test_convert_hf import ROOT


@pytest.mark.slow
def test_the_readme_default_run_reproduces_its_quoted_losses():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the README's run: one CPU device
  run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce_readme.py")],
                       capture_output=True, text=True, cwd=ROOT, timeout=1800, env=env)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "Every quoted figure reproduced." in run.stdout
