"""Tokenizers that turn text records into integer token ids.

Every tokenizer exposes the same small surface (see `Tokenizer`) so the packing
pipeline and the model only need `vocab_size`, `eos_id` and `encode`. `encode` gives the
ids a model reads for a text, BOS included when the tokenizer's file says the model was
trained with BOS in front (`add_bos_token`), so prompts and training records agree.
`config.data.tokenizer` selects one by name: 'byte' (the default, no files) or 'bpe',
a byte-level BPE read from `config.data.tokenizer_file` (a Hugging Face tokenizer.json
or a GGUF file's embedded vocabulary; see `bpe.py`). `from_config(config.data)` builds
the configured one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Tokenizer(Protocol):
  """The interface the data pipeline relies on."""

  name: str
  vocab_size: int
  bos_id: int
  eos_id: int
  add_bos_token: bool  # whether encode puts bos_id in front

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...


class ByteTokenizer:
  """UTF-8 byte-level tokenizer: needs no vocabulary file.

  Ids 0..255 are the raw UTF-8 bytes; 256 and 257 are the BOS/EOS specials.
  """

  name = 'byte'
  num_byte_ids = 256
  bos_id = 256
  eos_id = 257
  vocab_size = 258
  add_bos_token = False  # the byte models here are trained without BOS

  def encode(self, text: str) -> list[int]:
    """Returns the UTF-8 bytes of `text` as ids, shape [num_bytes].

    No BOS/EOS is added: the packer decides where record boundaries go.
    """
    return list(text.encode('utf-8'))

  def decode(self, ids: Iterable[int]) -> str:
    """Inverse of `encode` for ids of shape [num_tokens].

    Special ids and anything outside the byte range are dropped, and invalid
    byte sequences (e.g. a multi-byte character cut by a sequence boundary)
    become U+FFFD instead of raising, because model samples are arbitrary.
    """
    byte_values = bytes(token for token in map(int, ids) if 0 <= token < self.num_byte_ids)
    return byte_values.decode('utf-8', errors='replace')

  def __repr__(self) -> str:
    return 'ByteTokenizer()'


TOKENIZERS = ('byte', 'bpe')


def get_tokenizer(name: str, tokenizer_file: str = '', bos_id: int = -1, eos_id: int = -1,
                  chat_template: str = '') -> Tokenizer:
  """Builds the tokenizer selected by `config.data.tokenizer` (see `from_config`).

  Raises ValueError naming the config key when the name is unknown, when 'bpe' has no
  readable file, or when a file or special ids are given to the byte tokenizer.
  """
  if name == 'byte':
    if tokenizer_file or bos_id != -1 or eos_id != -1:
      raise ValueError(
          "config.data.tokenizer='byte' takes no config.data.tokenizer_file, bos_id or eos_id "
          f"(got {tokenizer_file!r}, {bos_id}, {eos_id}); use config.data.tokenizer='bpe'")
    return ByteTokenizer()
  if name == 'bpe':
    from adaptive_depth.data import bpe  # needs the optional `tokenizers` package
    return bpe.load(tokenizer_file, bos_id=bos_id, eos_id=eos_id, chat_template=chat_template)
  raise ValueError(f'Unknown config.data.tokenizer={name!r}; allowed values: '
                   f'{", ".join(repr(n) for n in TOKENIZERS)}.')


def from_config(data_config) -> Tokenizer:
  """The tokenizer `config.data` describes (tokenizer, tokenizer_file, bos_id, eos_id,
  chat_template); keys a partial config lacks take their defaults."""
  get = lambda key, default: data_config.get(key, default)
  return get_tokenizer(get('tokenizer', 'byte'), get('tokenizer_file', ''), get('bos_id', -1),
                       get('eos_id', -1), get('chat_template', ''))
