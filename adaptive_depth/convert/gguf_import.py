"""`from_gguf(path)`: a llama.cpp GGUF file (Llama / SmolLM / Qwen2) as config + params.

Tensors are dequantized to float32 with the `gguf` package. GGUF stores a [rows, cols]
matrix with its dimensions reversed (ne0 = cols first), so the dequantized array is already
in the PyTorch [out, in] layout that `layout.to_params` takes. For architecture 'llama',
llama.cpp's converter reordered the q and k rows for its interleaved RoPE; that is undone
here (Qwen2 files keep the half-split order, as this library does).
"""
from __future__ import annotations

import os
import re

import numpy as np

from adaptive_depth import cli
from adaptive_depth import model as model_lib
from adaptive_depth.convert import layout
from adaptive_depth.data import bpe

# GGUF tensor name -> neutral name (layout.py); per-layer names are 'blk.{i}.' + key.
_GLOBAL = {'token_embd.weight': 'embed', 'output_norm.weight': 'final_norm',
           'output.weight': 'lm_head'}
_PER_LAYER = {'attn_norm.weight': 'attn_norm', 'ffn_norm.weight': 'mlp_norm',
              'attn_q.weight': 'q', 'attn_k.weight': 'k', 'attn_v.weight': 'v',
              'attn_output.weight': 'o', 'ffn_gate.weight': 'gate', 'ffn_up.weight': 'up',
              'ffn_down.weight': 'down', 'attn_q.bias': 'q_bias', 'attn_k.bias': 'k_bias',
              'attn_v.bias': 'v_bias'}


def _import_gguf():
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise cli.MissingPackageError(
        "reading GGUF files needs the `gguf` package: "
        "pip install 'adaptive_depth[pretrained]' (or pip install gguf)") from None
  return gguf


def architecture(reader, path: str) -> layout.Architecture:
  """The model hyperparameters in a GGUF file's metadata; clear errors for what this
  library cannot run (other architectures, rope scaling, mixtures of experts, partial RoPE)."""

  def field(key, default=None):
    if key not in reader.fields:
      if default is None:
        raise ValueError(f'{path}: metadata key {key!r} is missing')
      return default
    value = reader.fields[key].contents()
    if isinstance(value, list):
      raise ValueError(f'{path}: {key} is a per-layer list; only uniform layers are supported')
    return value

  arch = field('general.architecture')
  if arch not in layout.FAMILIES:
    raise ValueError(f'{path}: general.architecture={arch!r} is not supported; allowed: '
                     f'{", ".join(layout.FAMILIES)}')
  get = lambda key, default=None: field(f'{arch}.{key}', default)
  scaling = get('rope.scaling.type', 'none')
  if scaling != 'none':
    raise ValueError(f'{path}: {arch}.rope.scaling.type={scaling!r} is not supported; '
                     "allowed: 'none' (plain RoPE)")
  if get('expert_count', 0):
    raise ValueError(f'{path}: {arch}.expert_count > 0 (mixture of experts) is not '
                     'supported; allowed: dense models')
  width, heads = int(get('embedding_length')), int(get('attention.head_count'))
  head_dim = int(get('attention.key_length', width // heads))
  rope_dims = int(get('rope.dimension_count', head_dim))
  if rope_dims != head_dim or int(get('attention.value_length', head_dim)) != head_dim:
    raise ValueError(f'{path}: {arch}.rope.dimension_count={rope_dims} or '
                     f'attention.value_length differs from the head size {head_dim}; only '
                     'full-width RoPE with equal key and value sizes is supported')
  tensors = {t.name: t for t in reader.tensors}
  if 'token_embd.weight' not in tensors:
    raise ValueError(f'{path}: no token_embd.weight tensor')
  return layout.Architecture(
      family=arch, vocab_size=int(tensors['token_embd.weight'].shape[-1]), width=width,
      num_layers=int(get('block_count')), num_heads=heads,
      num_kv_heads=int(get('attention.head_count_kv', heads)), head_dim=head_dim,
      mlp_dim=int(get('feed_forward_length')), rope_base=float(get('rope.freq_base', 10000.0)),
      norm_eps=float(get('attention.layer_norm_rms_epsilon')),
      tie_embeddings='output.weight' not in tensors,
      qkv_bias='blk.0.attn_q.bias' in tensors)


def _neutral_name(name: str, arch: layout.Architecture) -> str:
  if name in _GLOBAL:
    return _GLOBAL[name]
  match = re.fullmatch(r'blk\.(\d+)\.(.+)', name)
  if match and match.group(2) in _PER_LAYER and int(match.group(1)) < arch.num_layers:
    return f'{match.group(1)}.{_PER_LAYER[match.group(2)]}'
  raise ValueError(f'GGUF tensor {name!r} has no place in a {arch.family} model of this '
                   'library (an unsupported architecture variant?)')


def dequantize(gguf, tensor) -> np.ndarray:
  """One GGUF tensor as float32 [out, in] (or [n] for vectors)."""
  try:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:  # the `gguf` package's refusal of a type it has no decoder for
    raise ValueError(f'GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which '
                     'the installed `gguf` package cannot dequantize; convert the model to '
                     'another quantization (e.g. Q8_0, F16)') from None
  shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
  return np.asarray(values, np.float32).reshape(shape)


def from_gguf(path: str, progress: layout.Progress = None) -> layout.Imported:
  """Reads a GGUF file. Returns Imported(config, params, tokenizer); config.data points
  at the file itself for the tokenizer (launch/convert.py writes a tokenizer.json)."""
  if not os.path.isfile(path):
    raise cli.PathError(f'GGUF file {path!r} does not exist')
  with open(path, 'rb') as f:  # the gguf package's own refusal does not name the file
    if f.read(4) != b'GGUF':
      raise cli.UserError(f'{path}: not a GGUF file (it does not start with the GGUF magic)')
  gguf = _import_gguf()
  say = progress or (lambda message: None)
  say(f'reading {path}')
  reader = gguf.GGUFReader(path)
  arch = architecture(reader, path)
  say(f'{arch.family}: {arch.num_layers} layers, width {arch.width}, {arch.num_heads} heads '
      f'({arch.num_kv_heads} KV) of {arch.head_dim}, MLP {arch.mlp_dim}, vocabulary '
      f'{arch.vocab_size}, {"tied" if arch.tie_embeddings else "untied"} embeddings')
  tokenizer = bpe.from_gguf_reader(reader, os.path.abspath(path))
  config = layout.make_config(arch, tokenizer, os.path.abspath(path))
  tensors = {}
  for n, tensor in enumerate(reader.tensors):
    name = _neutral_name(tensor.name, arch)
    values = dequantize(gguf, tensor)
    if arch.family == 'llama' and name.split('.')[-1] in ('q', 'k'):
      heads = arch.num_heads if name.endswith('q') else arch.num_kv_heads
      values = layout.unpermute_rotary(values, heads)
    tensors[name] = values
    if (n + 1) % 50 == 0 or n + 1 == len(reader.tensors):
      say(f'dequantized {n + 1}/{len(reader.tensors)} tensors')
  cfg = model_lib.ModelConfig.from_config(config.model)
  return layout.Imported(config, layout.to_params(arch, cfg, tensors, say), tokenizer)

