"""A local TFDS builder for the Tiny Shakespeare corpus bundled with this package.

The corpus ships inside the package (`corpus/tinyshakespeare.txt`), so preparing the
dataset needs no network. It is written as ArrayRecord, which `as_data_source` reads with
plain numpy: TensorFlow is never imported.

Examples are paragraphs (runs of non-blank lines), in corpus order. `train` holds the
paragraphs that start before 90% of the characters, `validation` the rest, so the cut is
at the first paragraph boundary at or after 90%.
"""
from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

_CORPUS_FILE = 'tinyshakespeare.txt'
_TRAIN_FRACTION = 0.9

_log = logging.getLogger(__name__)


def read_bundled_corpus() -> str:
  """The raw corpus text, read from the installed package (works from wheels and zips)."""
  corpus = importlib.resources.files(__package__).joinpath('corpus', _CORPUS_FILE)
  return corpus.read_text(encoding='utf-8')


def split_paragraphs(text: str) -> list[tuple[int, str]]:
  """Splits text into paragraphs separated by blank (whitespace-only) lines.

  Returns:
    [(start_offset, paragraph)] in order, where start_offset is the character index of the
    paragraph in `text` and paragraph keeps its inner line breaks plus a trailing '\\n'
    (also for a last paragraph that lacks one in the file).
  """
  paragraphs = []
  current_lines: list[str] = []
  current_start = 0
  offset = 0
  for line in text.split('\n'):
    if line.strip():
      if not current_lines:
        current_start = offset
      current_lines.append(line)
    elif current_lines:
      paragraphs.append((current_start, '\n'.join(current_lines) + '\n'))
      current_lines = []
    offset += len(line) + 1  # +1 for the '\n' consumed by split.
  if current_lines:
    paragraphs.append((current_start, '\n'.join(current_lines) + '\n'))
  return paragraphs


def split_train_validation(text: str) -> dict[str, list[str]]:
  """{'train': [...], 'validation': [...]} paragraphs, cut at a boundary near 90%."""
  paragraphs = split_paragraphs(text)
  cut_offset = _TRAIN_FRACTION * len(text)
  num_train = sum(1 for start, _ in paragraphs if start < cut_offset)
  return {
      'train': [paragraph for _, paragraph in paragraphs[:num_train]],
      'validation': [paragraph for _, paragraph in paragraphs[num_train:]],
  }


class BundledTinyShakespeare(tfds.core.GeneratorBasedBuilder):
  """Tiny Shakespeare from the package's own copy; TFDS name `bundled_tiny_shakespeare`."""

  # Bump whenever the corpus file or the paragraph/split rules change: prepared copies in a
  # data dir are reused by version and would otherwise go stale silently.
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Paragraph examples; 90/10 character split.'}

  # TFDS 4.9.10 derives this from the package via an `isinstance` check against the
  # `importlib_resources` backport, which it imports lazily but does not install on Python
  # >= 3.9 (tensorflow/datasets#11212), so `download_and_prepare` crashes for builders
  # defined inside a package. It is only used to look for an optional checksums file.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo is built directly rather than via `dataset_info_from_configs`, which would
    # look for README/CITATIONS metadata files next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description='Tiny Shakespeare (Karpathy, char-rnn), one example per paragraph.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        homepage='https://github.com/karpathy/char-rnn',
        # Without this TFDS stores examples in hash-of-key order; we want corpus order so
        # that unshuffled reading (evaluation) sees contiguous text.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the corpus is part of the package.
    splits = split_train_validation(read_bundled_corpus())
    return {name: self._generate_examples(paragraphs) for name, paragraphs in splits.items()}

  def _generate_examples(self, paragraphs: list[str]) -> Iterator[tuple[int, dict[str, str]]]:
    # Integer keys: with shuffling disabled TFDS sorts by key, so key = paragraph index
    # reproduces corpus order exactly.
    for index, paragraph in enumerate(paragraphs):
      yield index, {'text': paragraph}

  # TFDS prints two bold banners per preparation; one log line is enough for a 1 MB corpus.
  def _log_download_bytes(self) -> None:
    _log.info('Preparing %s in %s', self.name, self.data_dir)

  def _log_download_done(self) -> None:
    _log.info('Prepared %s in %s', self.name, self.data_dir)


@contextlib.contextmanager
def _tfds_progress_bars_hidden() -> Iterator[None]:
  """Hides TFDS's tqdm bars temporarily, restoring the user's previous choice after."""
  # TFDS only offers a global on/off switch; its current value is a private module flag.
  tqdm_utils = tfds.core.utils.tqdm_utils
  was_enabled = getattr(tqdm_utils, '_active', True)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(was_enabled)


def default_data_dir() -> str:
  """$TFDS_DATA_DIR if set, else ~/tensorflow_datasets (TFDS's own default)."""
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def prepare_bundled_tiny_shakespeare(data_dir: str | None = None) -> BundledTinyShakespeare:
  """Returns the builder with its ArrayRecord files written (once) under `data_dir`."""
  builder = BundledTinyShakespeare(
      data_dir=data_dir or default_data_dir(), file_format='array_record')
  with _tfds_progress_bars_hidden():
    builder.download_and_prepare()
  return builder
