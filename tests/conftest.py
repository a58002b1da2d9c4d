"""Shared test setup: absl flags parsed (grain reads them), a per-session compilation
cache, paths to optional shared data."""
import os
import pathlib
import tempfile

import jax
import pytest
from absl import flags

flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The suite compiles the same small programs many times (in this process and in the
# experiments it starts as subprocesses): a persistent compilation cache, fresh for each
# session, turns every repeat into a cache read. It changes no compile option, so the
# programs are the ones production runs.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               tempfile.mkdtemp(prefix="jax_cache_tests_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def shared_data():
  if not SHARED_DATA.is_dir():
    pytest.skip("../shared/data is absent")
  return SHARED_DATA
