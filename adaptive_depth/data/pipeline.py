"""Text sources and deterministic, resumable packed LM batches.

Flow: `load_text_source` gives random access to the text records of a TFDS split (read
from ArrayRecord files, so no TensorFlow); `PackedBatches` visits the records in a seeded
per-epoch order, tokenizes them lazily one at a time (`encode` puts BOS in front when the
tokenizer adds it), appends EOS to each, and cuts the concatenated token stream into rows
of `seq_len + 1` tokens. `make_train_and_eval_data` wires both from `config.data`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from adaptive_depth.data.tiny_shakespeare import BundledTinyShakespeare
from adaptive_depth.data.tiny_shakespeare import prepare_bundled_tiny_shakespeare
from adaptive_depth.data.tokenizers import Tokenizer
from adaptive_depth.data import tokenizers

_log = logging.getLogger(__name__)


class _TextFeatureView(Sequence[str]):
  """Read-only view of one text feature of a TFDS data source, decoded to str."""

  def __init__(self, records: Sequence[dict[str, Any]], text_feature: str):
    self._records = records
    self._text_feature = text_feature

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> str:
    # ArrayRecord raises ValueError out of range; Sequence semantics need IndexError.
    if not -len(self) <= index < len(self):
      raise IndexError(f'Record {index} out of range for {len(self)} records.')
    value = self._records[index % len(self)][self._text_feature]
    # TFDS's numpy decoding (the no-TensorFlow path) returns Text features as bytes.
    if isinstance(value, bytes):
      return value.decode('utf-8', errors='replace')
    return str(value)

  def __iter__(self) -> Iterator[str]:
    return (self[index] for index in range(len(self)))


def _feature_keys(records: Sequence[dict[str, Any]]) -> list[str]:
  """Top-level feature names, from the dataset info when available (no record read)."""
  features = getattr(getattr(records, 'dataset_info', None), 'features', None)
  if features is not None and hasattr(features, 'keys'):
    return sorted(features.keys())
  return sorted(records[0].keys()) if len(records) else []


def _abbreviate(message: str, head_lines: int = 4, tail_lines: int = 12) -> str:
  """Elides the middle of long messages (TFDS's not-found error lists every dataset)."""
  lines = message.splitlines()
  if len(lines) <= head_lines + tail_lines + 1:
    return message
  omitted = len(lines) - head_lines - tail_lines
  return '\n'.join(lines[:head_lines] + [f'  [... {omitted} lines omitted ...]'] +
                   lines[-tail_lines:])


def load_text_source(dataset: str, split: str, text_feature: str,
                     data_dir: str | None = None) -> Sequence[str]:
  """Random-access text records of a TFDS split, without TensorFlow.

  `bundled_tiny_shakespeare` is prepared on first use from the corpus inside this package
  (data_dir defaults to $TFDS_DATA_DIR or ~/tensorflow_datasets). Any other dataset must
  already be prepared in ArrayRecord format under data_dir (None or '' = TFDS's default);
  nothing is downloaded.

  Returns:
    A sequence of length [num_records] whose items are the `text_feature` strings.
  """
  data_dir = data_dir or None  # config.data.tfds_data_dir uses '' for "the default".
  if dataset == BundledTinyShakespeare.name:
    # An unknown split raises TFDS's own ValueError, which already lists the splits.
    records = prepare_bundled_tiny_shakespeare(data_dir).as_data_source(split=split)
  else:
    try:
      records = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # TFDS raises many types here; all mean "not usable as is".
      raise ValueError(
          f'Could not open config.data.dataset={dataset!r} (split {split!r}, data_dir '
          f'{data_dir!r}). Datasets other than {BundledTinyShakespeare.name!r} must already '
          'be prepared locally in array_record format (e.g. `tfds build --file_format='
          f'array_record {dataset}`). Underlying error: '
          f'{type(err).__name__}: {_abbreviate(str(err))}') from err
  available = _feature_keys(records)
  if text_feature not in available:
    raise ValueError(f'config.data.text_feature={text_feature!r} is not a feature of '
                     f'{dataset!r}; available feature keys: {available}.')
  return _TextFeatureView(records, text_feature)


class PackedBatches(Iterator[np.ndarray]):
  """Deterministic, resumable iterator of packed fixed-length LM rows.

  Records are read in a per-epoch order (a permutation drawn from
  `np.random.default_rng([seed, epoch])`, or index order without shuffling), each is
  tokenized (with BOS first when the tokenizer adds it, so every record starts as the model's
  prompts do) and followed by `tokenizer.eos_id`, and the concatenated stream is cut into rows
  of `seq_len + 1` tokens (the consumer splits them into inputs row[:-1] and targets
  row[1:]). Rows are grouped into global batches of `batch_size`; host `shard_index` gets
  its contiguous `batch_size // num_shards` rows of every global batch. Every host walks the
  same global stream, so hosts stay in lockstep and agree on when the data runs out.

  Memory stays small whatever the dataset size: at most one global batch plus one record
  of tokens, and the current epoch's permutation ([num_records] int64).

  Yields:
    int32 arrays of shape [batch_size // num_shards, seq_len + 1].
  """

  def __init__(self, source: Sequence[str], tokenizer: Tokenizer, *, batch_size: int,
               seq_len: int, seed: int, shuffle: bool = True, repeat: bool = True,
               shard_index: int = 0, num_shards: int = 1):
    if batch_size <= 0 or seq_len <= 0:
      raise ValueError(f'batch_size ({batch_size}) and seq_len ({seq_len}) must be positive.')
    if num_shards <= 0 or not 0 <= shard_index < num_shards:
      raise ValueError(f'Need 0 <= shard_index ({shard_index}) < num_shards ({num_shards}).')
    if batch_size % num_shards:
      raise ValueError(f'batch_size ({batch_size}) must be divisible by the number of data '
                       f'shards/hosts ({num_shards}) so every host gets equal rows.')
    if int(seed) < 0:
      raise ValueError(f'seed must be non-negative for numpy seeding, got {seed}.')
    if len(source) == 0:
      raise ValueError('Cannot pack batches from an empty text source.')
    self._source = source
    self._tokenizer = tokenizer
    self._batch_size = batch_size
    self._row_len = seq_len + 1
    self._seed = int(seed)
    self._shuffle = shuffle
    self._repeat = repeat
    self._local_rows = slice(shard_index * (batch_size // num_shards),
                             (shard_index + 1) * (batch_size // num_shards))
    self._num_records = len(source)
    # Position in the stream: records [0, cursor) of `epoch`'s order have been tokenized;
    # `pending` holds their tokens not yet emitted (as a list of int32 chunks).
    self._epoch = 0
    self._cursor = 0
    self._pending: list[np.ndarray] = []
    self._pending_len = 0
    self._batches_emitted = 0
    self._order_epoch = -1
    self._order: np.ndarray | None = None

  def _record_index(self, epoch: int, position: int) -> int:
    """Source index of the `position`-th record visited in `epoch`."""
    if not self._shuffle:
      return position
    if self._order_epoch != epoch:  # Drawn once per epoch, not once per record.
      self._order = np.random.default_rng([self._seed, epoch]).permutation(self._num_records)
      self._order_epoch = epoch
    return int(self._order[position])

  def _read_next_record(self) -> bool:
    """Appends the next record's tokens ([BOS] text) + EOS to `pending`; False once the
    data ends."""
    if self._cursor == self._num_records:
      if not self._repeat:
        return False
      self._epoch += 1
      self._cursor = 0
    text = self._source[self._record_index(self._epoch, self._cursor)]
    self._cursor += 1
    tokens = np.asarray(list(self._tokenizer.encode(text)) + [self._tokenizer.eos_id],
                        dtype=np.int32)
    self._pending.append(tokens)
    self._pending_len += tokens.size
    return True

  def __iter__(self) -> PackedBatches:
    return self

  def __next__(self) -> np.ndarray:
    global_tokens = self._batch_size * self._row_len
    while self._pending_len < global_tokens:
      if not self._read_next_record():
        if self._batches_emitted == 0:
          _log.warning('Text source has fewer than %d tokens (one global batch): no batches.',
                       global_tokens)
        raise StopIteration
    stream = np.concatenate(self._pending)
    global_batch = stream[:global_tokens].reshape(self._batch_size, self._row_len)
    # Copies, so neither the returned batch nor the leftover pins the whole stream buffer.
    leftover = stream[global_tokens:].copy()
    self._pending = [leftover] if leftover.size else []
    self._pending_len = leftover.size
    self._batches_emitted += 1
    return global_batch[self._local_rows].copy()

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position in the stream; see `set_state`.

    The state describes the global stream, so it is the same on every host and can be
    restored with a different number of hosts or batch size.
    """
    leftover = np.concatenate(self._pending) if self._pending else np.zeros(0, np.int32)
    return {
        'epoch': self._epoch,
        'record_cursor': self._cursor,
        'leftover_tokens': leftover.tolist(),
        'batches_emitted': self._batches_emitted,
        # Not part of the position, but the cursor is meaningless if these changed.
        'num_records': self._num_records,
        'seed': self._seed,
        'shuffle': self._shuffle,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues exactly where the iterator that produced `state` was."""
    expected = {'num_records': self._num_records, 'shuffle': self._shuffle}
    if self._shuffle:  # The seed only matters when it picks the order.
      expected['seed'] = self._seed
    mismatches = {key: f'state has {state[key]!r}, iterator has {value!r}'
                  for key, value in expected.items() if key in state and state[key] != value}
    if mismatches:
      raise ValueError(f'Data iterator state does not fit this iterator: {mismatches}.')
    self._epoch = int(state['epoch'])
    self._cursor = int(state['record_cursor'])
    leftover = np.asarray(state['leftover_tokens'], dtype=np.int32)
    self._pending = [leftover] if leftover.size else []
    self._pending_len = leftover.size
    self._batches_emitted = int(state['batches_emitted'])


_REQUIRED = object()


def _data_option(data_config: Any, key: str, default: Any = _REQUIRED) -> Any:
  value = getattr(data_config, key, default)
  if value is _REQUIRED:
    raise ValueError(f'config.data.{key} must be set.')
  return value


def make_train_and_eval_data(
    data_config: Any, *, batch_size: int, eval_batch_size: int, seed: int,
    shard_index: int = 0, num_shards: int = 1,
) -> tuple[PackedBatches, Callable[[], Iterator[np.ndarray]], Tokenizer]:
  """Builds the training iterator, an eval-iterator factory and the tokenizer.

  Args:
    data_config: `config.data` (ConfigDict or any attribute object) with `seq_len` and
      optionally dataset, text_feature, train_split, eval_split, tfds_data_dir, tokenizer.
    batch_size, eval_batch_size: global batch sizes (rows), divisible by num_shards.
    seed: seeds the training shuffle.
    shard_index, num_shards: this host's index and the number of hosts.

  Returns:
    (train, make_eval, tokenizer): `train` shuffles and repeats forever, yielding int32
    [batch_size // num_shards, seq_len + 1]; `make_eval()` returns a fresh unshuffled,
    single-pass iterator of [eval_batch_size // num_shards, seq_len + 1] over the eval
    split, giving the same batches on every call.
  """
  dataset = _data_option(data_config, 'dataset', 'bundled_tiny_shakespeare')
  text_feature = _data_option(data_config, 'text_feature', 'text')
  data_dir = _data_option(data_config, 'tfds_data_dir', None)
  seq_len = int(_data_option(data_config, 'seq_len'))
  tokenizer = tokenizers.from_config(data_config)
  train_source = load_text_source(
      dataset, _data_option(data_config, 'train_split', 'train'), text_feature, data_dir)
  eval_source = load_text_source(
      dataset, _data_option(data_config, 'eval_split', 'validation'), text_feature, data_dir)

  train = PackedBatches(train_source, tokenizer, batch_size=batch_size, seq_len=seq_len,
                        seed=seed, shuffle=True, repeat=True, shard_index=shard_index,
                        num_shards=num_shards)

  def make_eval() -> PackedBatches:
    return PackedBatches(eval_source, tokenizer, batch_size=eval_batch_size, seq_len=seq_len,
                         seed=seed, shuffle=False, repeat=False, shard_index=shard_index,
                         num_shards=num_shards)

  make_eval()  # Validates the eval arguments now rather than at the first evaluation.
  return train, make_eval, tokenizer
