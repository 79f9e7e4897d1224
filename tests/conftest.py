"""Test session set-up: one private TFDS data dir, prepared before any test runs (once per
pytest-xdist worker: each worker is its own session).

Tests (and the training subprocesses they start, which inherit the environment) then never
write into the home directory and never race to prepare the bundled dataset.
"""
import os

import pytest


@pytest.fixture(scope='session', autouse=True)
def private_tfds_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tensorflow_datasets'))
  previous = os.environ.get('TFDS_DATA_DIR')
  os.environ['TFDS_DATA_DIR'] = data_dir
  from adaptive_depth.data import tiny_shakespeare
  tiny_shakespeare.prepare_bundled_tiny_shakespeare(data_dir)
  yield data_dir
  if previous is None:
    os.environ.pop('TFDS_DATA_DIR', None)
  else:
    os.environ['TFDS_DATA_DIR'] = previous
