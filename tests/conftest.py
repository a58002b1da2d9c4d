"""Shared test setup: absl flags parsed (grain reads them), paths to optional shared data."""
import os
import pathlib

import pytest
from absl import flags

flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data():
  if not SHARED_DATA.is_dir():
    pytest.skip("../shared/data is absent")
  return SHARED_DATA
