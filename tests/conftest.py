"""Eight simulated CPU devices, compiled fast (tests/helpers.py), for every test: set before jax is
imported anywhere."""

import os

from tests.helpers import FAST_COMPILE  # noqa: E402 (imports no jax)

os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8 "
                           f"{FAST_COMPILE}").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
