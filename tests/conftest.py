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
# programs are the ones production runs. Programs that compile in 0.05 s or more are
# cached: against 0.5 s, test_pretrain + test_pipeline took 177 s instead of 194 s and
# test_multihost + test_sft + test_rlhf 148 s instead of 153 s (one process, quiet cores).
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               tempfile.mkdtemp(prefix="jax_cache_tests_"))
_MIN_SECS = os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(_MIN_SECS))


@pytest.fixture
def shared_data():
  if not SHARED_DATA.is_dir():
    pytest.skip("../shared/data is absent")
  return SHARED_DATA
