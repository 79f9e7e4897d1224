"""Tokenizers that turn text records into integer token ids.

Every tokenizer exposes the same small surface (see `Tokenizer`) so the packing
pipeline and the model only need `vocab_size`, `eos_id` and `encode`.  New
tokenizers (e.g. BPE) are added by registering a factory in
`_TOKENIZER_FACTORIES`; `config.data.tokenizer` selects one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol


class Tokenizer(Protocol):
  """The interface the data pipeline relies on."""

  name: str
  vocab_size: int
  bos_id: int
  eos_id: int

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


_TOKENIZER_FACTORIES: dict[str, Callable[[], Tokenizer]] = {
    'byte': ByteTokenizer,
}


def get_tokenizer(name: str) -> Tokenizer:
  """Builds the tokenizer selected by `config.data.tokenizer`."""
  try:
    factory = _TOKENIZER_FACTORIES[name]
  except KeyError:
    allowed = ', '.join(repr(key) for key in sorted(_TOKENIZER_FACTORIES))
    raise ValueError(
        f'Unknown config.data.tokenizer={name!r}; allowed values: {allowed}.') from None
  return factory()
