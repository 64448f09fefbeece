"""Fixtures shared by test modules."""

import os
import tempfile

# No test reads or writes this user's host probe (profilers.neighbours): where none is stored,
# busy cores count as slowing the measured thread, the behaviour the tests expect.
os.environ["MDP_TRT_HOST_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="mdp-trt-host-"), "host.json")

from helpers_timing import fake_timing  # noqa: F401, E402 (a fixture: whole models timed by their size)
