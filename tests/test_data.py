"""Tests for adaptive_depth.data: tokenizer, bundled TFDS builder, packed batches."""
from __future__ import annotations

import itertools
import json
import os
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import adaptive_depth.data as data_lib
from adaptive_depth.data import ByteTokenizer
from adaptive_depth.data import PackedBatches
from adaptive_depth.data import get_tokenizer
from adaptive_depth.data import load_text_source
from adaptive_depth.data import make_train_and_eval_data
from adaptive_depth.data.tiny_shakespeare import split_paragraphs

TOKENIZER = ByteTokenizer()
TINY_SOURCE = ['to be', 'or not', 'to be:\nthat', 'is the', 'question']


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory) -> str:
  """One TFDS data dir per test session, so the corpus is prepared only once."""
  return str(tmp_path_factory.mktemp('tensorflow_datasets'))


@pytest.fixture(scope='session')
def shakespeare(tfds_dir) -> dict[str, list[str]]:
  return {split: list(load_text_source('bundled_tiny_shakespeare', split, 'text', tfds_dir))
          for split in ('train', 'validation')}


def reference_stream(records: list[str]) -> np.ndarray:
  """Every record's bytes followed by EOS, concatenated: the packer's expected stream."""
  return np.concatenate([TOKENIZER.encode(r) + [TOKENIZER.eos_id] for r in records])


def take(iterator, count: int) -> list[np.ndarray]:
  return list(itertools.islice(iterator, count))


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_non_ascii():
  text = 'Ünïcödé — 日本語 🙂\nsecond line'
  ids = TOKENIZER.encode(text)
  assert len(ids) == len(text.encode('utf-8')) and all(0 <= i < 256 for i in ids)
  assert TOKENIZER.decode(ids) == text
  assert TOKENIZER.decode(np.asarray(ids, np.int32)) == text
  assert (TOKENIZER.vocab_size, TOKENIZER.bos_id, TOKENIZER.eos_id) == (258, 256, 257)


def test_byte_tokenizer_decode_skips_specials_and_out_of_range():
  ids = [TOKENIZER.bos_id] + TOKENIZER.encode('ab') + [TOKENIZER.eos_id, 258, 1000]
  assert TOKENIZER.decode(ids) == 'ab'


def test_get_tokenizer():
  assert isinstance(get_tokenizer('byte'), ByteTokenizer)
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer.*'byte'"):
    get_tokenizer('sentencepiece')


# ---------------------------------------------------------------- bundled builder


def test_split_paragraphs_handles_extra_blank_lines_and_missing_final_newline():
  text = 'A:\nhi\n\n\nB:\nyo\n  \nC:\nbye'
  assert split_paragraphs(text) == [(0, 'A:\nhi\n'), (8, 'B:\nyo\n'), (17, 'C:\nbye\n')]


def test_builder_splits_reproduce_corpus(shakespeare):
  corpus_path = os.path.join(os.path.dirname(data_lib.__file__), 'corpus', 'tinyshakespeare.txt')
  with open(corpus_path, encoding='utf-8') as f:
    raw = f.read()
  train, validation = shakespeare['train'], shakespeare['validation']
  assert train and validation
  assert all(p.endswith('\n') and '\n\n' not in p for p in train + validation)
  # Same lines in the same order; only the blank separator lines are gone.
  assert ''.join(train + validation).splitlines() == [l for l in raw.splitlines() if l.strip()]
  validation_fraction = sum(map(len, validation)) / sum(map(len, train + validation))
  assert 0.09 < validation_fraction < 0.11


def test_load_text_source_errors(tfds_dir):
  with pytest.raises(ValueError, match=r"config\.data\.text_feature.*\['text'\]"):
    load_text_source('bundled_tiny_shakespeare', 'train', 'content', tfds_dir)
  with pytest.raises(ValueError, match=r'config\.data\.dataset.*array_record'):
    load_text_source('no_such_dataset_here', 'train', 'text', tfds_dir)


class ToyPreparedText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stands in for a dataset the user prepared earlier: only its files are left."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # Sidesteps TFDS's importlib_resources lookup (see tiny_shakespeare.py).

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,
        features=tfds.features.FeaturesDict({'content': tfds.features.Text(), 'id': np.int32}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for index, text in enumerate(TINY_SOURCE):
      yield index, {'content': text, 'id': index}


def test_load_text_source_reads_other_prepared_array_record_dataset(tmp_path):
  ToyPreparedText(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  source = load_text_source('toy_prepared_text', 'train', 'content', str(tmp_path))
  assert list(source) == TINY_SOURCE
  with pytest.raises(ValueError, match=r"\['content', 'id'\]"):
    load_text_source('toy_prepared_text', 'train', 'text', str(tmp_path))


# ---------------------------------------------------------------- packed batches


def test_packed_batches_shape_and_dtype(shakespeare):
  batches = PackedBatches(shakespeare['train'], TOKENIZER, batch_size=4, seq_len=32, seed=0)
  batch = next(batches)
  assert batch.shape == (4, 33) and batch.dtype == np.int32
  assert batch.min() >= 0 and batch.max() < TOKENIZER.vocab_size


def test_packed_batches_deterministic_per_seed(shakespeare):
  def first_five(seed):
    return np.stack(take(PackedBatches(shakespeare['train'], TOKENIZER, batch_size=4,
                                       seq_len=32, seed=seed), 5))
  np.testing.assert_array_equal(first_five(3), first_five(3))
  assert not np.array_equal(first_five(3), first_five(4))


def test_unshuffled_epoch_matches_reference_stream(shakespeare):
  records = shakespeare['validation']
  batches = PackedBatches(records, TOKENIZER, batch_size=4, seq_len=64, seed=0,
                          shuffle=False, repeat=False)
  packed = np.concatenate([batch.reshape(-1) for batch in batches])
  expected = reference_stream(records)
  assert len(expected) - len(packed) < 4 * 65  # Only a partial last batch is dropped.
  np.testing.assert_array_equal(packed, expected[:len(packed)])


def test_shuffled_epoch_follows_seeded_permutation():
  order = np.random.default_rng([7, 0]).permutation(len(TINY_SOURCE))
  expected = reference_stream([TINY_SOURCE[i] for i in order])
  batches = PackedBatches(TINY_SOURCE, TOKENIZER, batch_size=1, seq_len=4, seed=7,
                          repeat=False)
  packed = np.concatenate([batch.reshape(-1) for batch in batches])
  np.testing.assert_array_equal(packed, expected[:len(packed)])


@pytest.mark.parametrize('source_name', ['shakespeare', 'tiny'])
def test_state_round_trip(shakespeare, source_name):
  if source_name == 'shakespeare':
    source, batch_size, seq_len = shakespeare['train'], 4, 32
  else:  # ~55 tokens per epoch, 18 per batch: the 5 resumed batches cross epochs.
    source, batch_size, seq_len = TINY_SOURCE, 2, 8
  def make():
    return PackedBatches(source, TOKENIZER, batch_size=batch_size, seq_len=seq_len, seed=1)
  original = make()
  take(original, 7)
  state = json.loads(json.dumps(original.get_state()))
  expected = take(original, 5)
  if source_name == 'tiny':
    assert original.get_state()['epoch'] > state['epoch']
  resumed = make()
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(take(resumed, 5)), np.stack(expected))
  assert resumed.get_state() == original.get_state()


def test_set_state_rejects_state_of_a_different_stream():
  state = PackedBatches(TINY_SOURCE, TOKENIZER, batch_size=2, seq_len=8, seed=1).get_state()
  with pytest.raises(ValueError, match='seed'):
    PackedBatches(TINY_SOURCE, TOKENIZER, batch_size=2, seq_len=8, seed=2).set_state(state)


def test_shards_concatenate_to_the_global_batch(shakespeare):
  def make(**shard):
    return PackedBatches(shakespeare['train'], TOKENIZER, batch_size=4, seq_len=16, seed=5,
                         **shard)
  whole = take(make(), 3)
  first = take(make(shard_index=0, num_shards=2), 3)
  second = take(make(shard_index=1, num_shards=2), 3)
  for batch, half0, half1 in zip(whole, first, second):
    assert half0.shape == (2, 17)
    np.testing.assert_array_equal(np.concatenate([half0, half1]), batch)
  with pytest.raises(ValueError, match='divisible'):
    make(shard_index=0, num_shards=3)


def test_no_repeat_stops_after_last_full_batch():
  batches = PackedBatches(TINY_SOURCE, TOKENIZER, batch_size=2, seq_len=4, seed=0,
                          repeat=False)
  assert len(list(batches)) == len(reference_stream(TINY_SOURCE)) // (2 * 5)
  with pytest.raises(StopIteration):
    next(batches)


# ---------------------------------------------------------------- config wiring


def test_make_train_and_eval_data(tfds_dir, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', tfds_dir)  # Default data dir; the corpus is there.
  config = ml_collections.ConfigDict({'seq_len': 64, 'tokenizer': 'byte', 'tfds_data_dir': ''})
  train, make_eval, tokenizer = make_train_and_eval_data(
      config, batch_size=8, eval_batch_size=4, seed=0, shard_index=1, num_shards=2)
  assert isinstance(tokenizer, ByteTokenizer)
  assert next(train).shape == (4, 65)
  first_pass, second_pass = list(make_eval()), list(make_eval())
  assert first_pass and first_pass[0].shape == (2, 65)
  np.testing.assert_array_equal(np.stack(first_pass), np.stack(second_pass))
  with pytest.raises(ValueError, match=r'config\.data\.seq_len'):
    make_train_and_eval_data(ml_collections.ConfigDict(), batch_size=8, eval_batch_size=4,
                             seed=0)


def test_no_tensorflow_needed():
  assert 'tensorflow' not in sys.modules
