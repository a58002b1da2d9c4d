"""Shared test setup: absl flags parsed (grain reads them), paths to optional shared data, the
compile settings of the test session (below), and the tiny pretraining run later stages share."""
import os
import pathlib
import shutil
import tempfile

import pytest
from absl import flags

flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Compiling is most of this suite's time on a 2-core CPU: the models are tiny, the programs not.
# Both settings below go through the environment before JAX starts, so the experiment
# subprocesses the tests launch get them too (a test that sets XLA_FLAGS for a subprocess
# appends to the session's).
#
# 1. XLA's backend optimisation and CPU fusion emitters off, as experiments.rlhf.FAST_COMPILE
#    does for its test preset: the train step of tests/test_train_step.py compiles in 0.8 s
#    instead of 5.2 s and gives the same losses to the bit; the programs run slower, which
#    tiny models hardly notice. A test about what the optimised compile emits asks for the
#    default options itself (tests/test_kernels.py, PRODUCTION_COMPILE).
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f'{os.environ.get("XLA_FLAGS", "")} {FAST_COMPILE_XLA_FLAGS}'.strip()
# 2. JAX's on-disk compilation cache, fresh for each session and removed at its end: a test that
#    compiles what an earlier one did (a resumed or restarted run, the same run in another
#    subprocess) reads the executable instead of compiling it again. Results are unchanged: a
#    hit is the executable that compiling the same program with the same flags gives.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="jax-test-compilation-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
  """A finished tiny pretraining run (a stage workdir) that the later stages' tests (SFT, the
  reward model) start from: trained once per session, not once per module. seq_len 192 is
  SFT's: a stage's data.seq_len may not exceed its init model's max_len."""
  from tests.test_pretrain import tiny_pretrain_workdir  # pylint: disable=g-import-not-at-top
  return tiny_pretrain_workdir(tmp_path_factory.mktemp("tiny_pretrained"), seq_len=192,
                               d_model=32, num_layers=1, steps=2)


@pytest.fixture
def shared_data():
  if not SHARED_DATA.is_dir():
    pytest.skip("../shared/data is absent")
  return SHARED_DATA
