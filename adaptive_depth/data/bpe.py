"""Byte-level BPE tokenizers (GPT-2 style) from a tokenizer.json or a GGUF file.

`load(path)` reads either
  * a Hugging Face `tokenizer.json` (used as is; special ids and the chat template come
    from a `tokenizer_config.json` / `config.json` beside it when present), or
  * a `.gguf` file's embedded vocabulary: `tokenizer.ggml.tokens` (id = index),
    `tokenizer.ggml.merges` ("left right", highest priority first),
    `tokenizer.ggml.token_type` (3 = control, 4 = user defined: matched whole in text),
    `tokenizer.ggml.pre` (how text is split before merging), the bos/eos ids and
    `tokenizer.chat_template`.
Both become a `tokenizers.Tokenizer`; `BPETokenizer` gives it the surface of
`ByteTokenizer` (name, vocab_size, bos_id, eos_id, add_bos_token, encode, decode).

Whether `encode` puts BOS in front is the file's own setting, as transformers 5 applies it:
a tokenizer.json whose post-processor adds a leading special token (tokenizer_config.json's
`add_bos_token` alone does not decide); a GGUF file's `tokenizer.ggml.add_bos_token`.

Needs the `tokenizers` package (and `gguf` for GGUF files):
pip install 'adaptive_depth[pretrained]'.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence

from adaptive_depth import cli

try:
  import tokenizers as hf_tokenizers
except ImportError:  # reported when a BPE tokenizer is asked for
  hf_tokenizers = None

# GGUF token types (the GGUF spec's enum) that are matched as whole strings in text.
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer splits named by `tokenizer.ggml.pre`. GPT-2's regex runs inside the
# ByteLevel pre-tokenizer; the others are the published split patterns of those families.
_GPT2 = 'gpt2'
_SMOLLM = 'smollm'  # StarCoder-style: every digit alone, then GPT-2's regex
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {'default': _GPT2, 'gpt2': _GPT2, 'smollm': _SMOLLM,
                  'llama-bpe': _LLAMA3_SPLIT, 'qwen2': _QWEN2_SPLIT}


def _require_tokenizers():
  if hf_tokenizers is None:
    raise cli.MissingPackageError(
        "config.data.tokenizer='bpe' needs the `tokenizers` package: "
        "pip install 'adaptive_depth[pretrained]' (or pip install tokenizers)")


class BPETokenizer:
  """A byte-level BPE tokenizer with `ByteTokenizer`'s surface.

  encode puts `bos_id` in front when `add_bos_token` (the file's setting: the model was
  trained with BOS there, so prompts and training records need it) and never adds EOS (the
  packer appends it after each record); special tokens written in the text, such as
  '<|im_start|>', are matched whole. decode drops special tokens, as ByteTokenizer does.
  """

  name = 'bpe'

  def __init__(self, tokenizer, *, bos_id: int, eos_id: int, chat_template: str = '',
               add_bos_token: bool = False, source: str = ''):
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for key, value in (('bos_id', bos_id), ('eos_id', eos_id)):
      if not 0 <= value < self.vocab_size:
        raise ValueError(f'config.data.{key}={value} is not an id of the tokenizer in '
                         f'{source!r} (vocabulary of {self.vocab_size}); set config.data.{key}')
    self.bos_id, self.eos_id = int(bos_id), int(eos_id)
    self.chat_template = chat_template
    self.add_bos_token = bool(add_bos_token)
    self.source = source

  def encode(self, text: str) -> list[int]:
    """text -> ids [num_tokens]: BOS first when add_bos_token, never EOS."""
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    return [self.bos_id] + ids if self.add_bos_token else ids

  def decode(self, ids: Iterable[int]) -> str:
    """ids [num_tokens] -> text; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True
                          ) -> str:
    """Renders [{'role': ..., 'content': ...}, ...] with the chat template (needs jinja2)."""
    if not self.chat_template:
      raise ValueError(f'the tokenizer from {self.source!r} has no chat template; set '
                       'config.data.chat_template')
    import jinja2  # pylint: disable=g-import-not-at-top
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):  # templates call this to reject a conversation
      raise ValueError(f'chat template: {message}')

    env.globals['raise_exception'] = raise_exception
    token = lambda i: self.tokenizer.id_to_token(i) or ''
    return env.from_string(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=token(self.bos_id), eos_token=token(self.eos_id))

  def save(self, path: str) -> None:
    """Writes the vocabulary, merges and pre-tokenizer as a Hugging Face tokenizer.json.

    When BOS is added, the file's post-processor says so (as Llama's tokenizer.json does), so
    that the file alone, read back by `load` or by Hugging Face tokenizers, adds it too.
    """
    tokenizer = self.tokenizer
    if self.add_bos_token and leading_special_id(tokenizer) != self.bos_id:
      tokenizer = hf_tokenizers.Tokenizer.from_str(tokenizer.to_str())  # the cached one stays
      bos = tokenizer.id_to_token(self.bos_id)
      tokenizer.post_processor = hf_tokenizers.processors.TemplateProcessing(
          single=f'{bos} $A', pair=f'{bos} $A {bos}:1 $B:1', special_tokens=[(bos, self.bos_id)])
    tokenizer.save(path)

  def __repr__(self) -> str:
    return f'BPETokenizer({self.source!r}, vocab_size={self.vocab_size})'


def load(path: str, bos_id: int = -1, eos_id: int = -1, chat_template: str = '') -> BPETokenizer:
  """The BPE tokenizer in `path` (tokenizer.json or .gguf); -1 / '' keep the file's own
  bos id, eos id and chat template. Loaded once per file version (it is read at every
  config validation)."""
  if not path:
    raise ValueError("config.data.tokenizer='bpe' needs config.data.tokenizer_file: a "
                     'tokenizer.json or a .gguf file')
  if not os.path.isfile(path):
    raise ValueError(f'config.data.tokenizer_file={path!r} does not exist (or is not a file)')
  _require_tokenizers()
  return _load_cached(os.path.abspath(path), os.path.getmtime(path), bos_id, eos_id,
                      chat_template)


# (absolute path, mtime) -> (tokenizers.Tokenizer, the file's own ids and template).
_FILES: dict = {}


def _read_file(path, mtime):
  if (path, mtime) not in _FILES:
    if len(_FILES) >= 8:
      _FILES.pop(next(iter(_FILES)))
    _FILES[path, mtime] = _from_gguf(path) if path.endswith('.gguf') else (
        _from_tokenizer_json(path))
  return _FILES[path, mtime]


@functools.lru_cache(maxsize=8)
def _load_cached(path, mtime, bos_id, eos_id, chat_template):
  tokenizer, own = _read_file(path, mtime)
  ids = {'bos_id': bos_id, 'eos_id': eos_id}
  for key, value in ids.items():
    if value == -1:
      ids[key] = own[key]
    if ids[key] is None:
      raise ValueError(f'{path} does not say which token is {key[:3].upper()} (no '
                       f'tokenizer_config.json or config.json beside it names one); set '
                       f'config.data.{key}')
  return BPETokenizer(tokenizer, chat_template=chat_template or own['chat_template'],
                      add_bos_token=own['add_bos_token'], source=path, **ids)


def _from_tokenizer_json(path):
  """(Tokenizer, its own special ids / template) from tokenizer.json and its neighbours."""
  try:
    tokenizer = hf_tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # the Rust error says what is wrong with the file
    raise ValueError(f'config.data.tokenizer_file={path!r} is not a readable tokenizer.json: '
                     f'{e}') from e
  folder = os.path.dirname(path)
  read = lambda name: _read_json(os.path.join(folder, name))
  tok_config, model_config = read('tokenizer_config.json'), read('config.json')
  post_bos = leading_special_id(tokenizer)
  # The file's post-processor decides, as `tokenizers` and transformers run it for this file
  # (transformers 5 does not rebuild it from tokenizer_config.json's add_bos_token).
  own = {'chat_template': tok_config.get('chat_template') or '',
         'add_bos_token': post_bos is not None}
  if not isinstance(own['chat_template'], str):  # a list of named templates: take 'default'
    own['chat_template'] = next((t['template'] for t in own['chat_template']
                                 if t.get('name') == 'default'), '')
  jinja_file = os.path.join(folder, 'chat_template.jinja')  # where newer transformers save it
  if not own['chat_template'] and os.path.exists(jinja_file):
    with open(jinja_file, encoding='utf-8') as f:
      own['chat_template'] = f.read()
  for key in ('bos', 'eos'):
    token = tok_config.get(f'{key}_token')
    token = token.get('content') if isinstance(token, dict) else token
    token_id = tokenizer.token_to_id(token) if token else None
    if token_id is None and key == 'bos':
      token_id = post_bos  # the token the post-processor puts in front
    if token_id is None:
      token_id = model_config.get(f'{key}_token_id')
      token_id = token_id[0] if isinstance(token_id, list) else token_id
    own[f'{key}_id'] = None if token_id is None else int(token_id)
  return tokenizer, own


def leading_special_id(tokenizer):
  """The id of the special token `tokenizer`'s post-processor puts in front of every text
  (Llama's BOS), or None. Asked of the post-processor itself, so every kind counts
  (TemplateProcessing, nested in a Sequence or not, Roberta's and BERT's)."""
  plain = tokenizer.encode('a', add_special_tokens=False).ids
  full = tokenizer.encode('a', add_special_tokens=True).ids
  return full[0] if len(full) > len(plain) and full[:1] != plain[:1] else None


def _read_json(path) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _gguf_value(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def from_gguf_reader(reader, path: str) -> BPETokenizer:
  """The tokenizer in an open `gguf.GGUFReader` of the file `path` (its own ids/template)."""
  _require_tokenizers()
  path = os.path.abspath(path)
  tokenizer, own = _from_gguf(path, reader)
  _FILES[path, os.path.getmtime(path)] = tokenizer, own  # `load(path)` need not parse again
  if own['bos_id'] is None or own['eos_id'] is None:
    raise ValueError(f'{path}: no tokenizer.ggml.bos_token_id / eos_token_id in the file')
  return BPETokenizer(tokenizer, source=path, **own)


def _from_gguf(path, reader=None):
  """(Tokenizer, its own special ids / template) from a GGUF file's metadata."""
  if reader is None:
    try:
      import gguf  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise cli.MissingPackageError(
          "reading a tokenizer from a .gguf file needs the `gguf` package: "
          "pip install 'adaptive_depth[pretrained]'") from None
    reader = gguf.GGUFReader(path)  # parsing the metadata takes seconds for a 49k vocabulary
  model = _gguf_value(reader, 'tokenizer.ggml.model')
  if model != 'gpt2':
    raise ValueError(f'{path}: tokenizer.ggml.model={model!r} is not supported; allowed: '
                     "'gpt2' (byte-level BPE)")
  pre = _gguf_value(reader, 'tokenizer.ggml.pre', 'default')
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f'{path}: tokenizer.ggml.pre={pre!r} is not supported; allowed: '
                     f'{", ".join(sorted(PRE_TOKENIZERS))}')
  tokens = _gguf_value(reader, 'tokenizer.ggml.tokens')
  merges = _gguf_value(reader, 'tokenizer.ggml.merges')
  if not tokens or merges is None:
    raise ValueError(f'{path}: no tokenizer.ggml.tokens / tokenizer.ggml.merges in the file')
  types = _gguf_value(reader, 'tokenizer.ggml.token_type') or [1] * len(tokens)
  own = {'bos_id': _gguf_value(reader, 'tokenizer.ggml.bos_token_id'),
         'eos_id': _gguf_value(reader, 'tokenizer.ggml.eos_token_id'),
         'chat_template': _gguf_value(reader, 'tokenizer.chat_template', ''),
         'add_bos_token': bool(_gguf_value(reader, 'tokenizer.ggml.add_bos_token', False))}
  tokenizer = build_byte_level_bpe(tokens, [tuple(m.split(' ', 1)) for m in merges], types,
                                   pre)
  return tokenizer, own


def build_byte_level_bpe(tokens: Sequence[str], merges: Sequence[tuple[str, str]],
                         token_types: Sequence[int], pre: str = 'gpt2'):
  """A GPT-2 style byte-level BPE `tokenizers.Tokenizer`.

  tokens: the vocabulary in id order, spelt in GPT-2's byte-to-unicode alphabet; merges:
  (left, right) pairs by priority; token_types: GGUF token types, control and user-defined
  tokens are matched whole before BPE; pre: a PRE_TOKENIZERS name.
  """
  _require_tokenizers()
  models, pre_tokenizers = hf_tokenizers.models, hf_tokenizers.pre_tokenizers
  vocab = {token: i for i, token in enumerate(tokens)}
  tokenizer = hf_tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=list(merges),
                                                 fuse_unk=False, byte_fallback=False))
  split = PRE_TOKENIZERS[pre]
  if split == _GPT2:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  elif split == _SMOLLM:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  else:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(hf_tokenizers.Regex(split), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
  whole = lambda kind: [hf_tokenizers.AddedToken(tokens[i], special=kind == _CONTROL,
                                                  normalized=False)
                        for i, t in enumerate(token_types) if t == kind]
  # Already in the vocabulary, so their ids do not change; control tokens are special
  # (dropped by decode), user-defined ones are ordinary text.
  tokenizer.add_special_tokens(whole(_CONTROL))
  tokenizer.add_tokens(whole(_USER_DEFINED))
  return tokenizer
