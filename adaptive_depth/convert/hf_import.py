"""`from_hf_dir(path)`: a Hugging Face model directory (config.json, *.safetensors,
tokenizer.json) of a Llama-family model (Llama, SmolLM, Qwen2) as config + params.

Hugging Face checkpoints already use the half-split rotary order of `layers.apply_rope`,
and nn.Linear's [out, in] layout is the neutral form of `layout.py`, so tensors are only
renamed and cast to float32 here.
"""
from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from adaptive_depth import cli
from adaptive_depth import model as model_lib
from adaptive_depth.convert import layout
from adaptive_depth.data import bpe

_GLOBAL = {'model.embed_tokens.weight': 'embed', 'model.norm.weight': 'final_norm',
           'lm_head.weight': 'lm_head'}
_PER_LAYER = {'input_layernorm.weight': 'attn_norm',
              'post_attention_layernorm.weight': 'mlp_norm',
              'self_attn.q_proj.weight': 'q', 'self_attn.k_proj.weight': 'k',
              'self_attn.v_proj.weight': 'v', 'self_attn.o_proj.weight': 'o',
              'mlp.gate_proj.weight': 'gate', 'mlp.up_proj.weight': 'up',
              'mlp.down_proj.weight': 'down', 'self_attn.q_proj.bias': 'q_bias',
              'self_attn.k_proj.bias': 'k_bias', 'self_attn.v_proj.bias': 'v_bias'}
# Buffers some older checkpoints saved; recomputed here, so skipped.
_IGNORED = re.compile(r'.*rotary_emb\.inv_freq')


def architecture(hf_config: dict, where: str) -> layout.Architecture:
  """The hyperparameters in a config.json; clear errors for what this library cannot run."""
  c = hf_config
  family = c.get('model_type')
  if family not in layout.FAMILIES:
    raise ValueError(f'{where}: model_type={family!r} (architectures='
                     f'{c.get("architectures")}) is not supported; allowed: '
                     f'{", ".join(layout.FAMILIES)}')
  rope = c.get('rope_parameters') or c.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type != 'default':
    raise ValueError(f"{where}: rope scaling type {rope_type!r} is not supported; allowed: "
                     "'default' (plain RoPE)")
  unsupported = {'hidden_act': c.get('hidden_act', 'silu') != 'silu',
                 'mlp_bias': bool(c.get('mlp_bias', False)),
                 'partial_rotary_factor': c.get('partial_rotary_factor', 1.0) != 1.0,
                 'use_sliding_window': bool(c.get('use_sliding_window', False)),
                 'layer_types': any(t != 'full_attention' for t in c.get('layer_types') or [])}
  if family == 'llama':  # Qwen2's q/k/v biases are part of the architecture
    unsupported['attention_bias'] = bool(c.get('attention_bias', False))
  bad = [f'{key}={c.get(key)!r}' for key, is_bad in unsupported.items() if is_bad]
  if bad:
    raise ValueError(f'{where}: {", ".join(bad)} not supported; this library runs SiLU-gated '
                     'MLPs without bias, full-width RoPE and full causal attention')
  heads = int(c['num_attention_heads'])
  rope_base = rope.get('rope_theta', c.get('rope_theta', 10000.0))
  return layout.Architecture(
      family=family, vocab_size=int(c['vocab_size']), width=int(c['hidden_size']),
      num_layers=int(c['num_hidden_layers']), num_heads=heads,
      num_kv_heads=int(c.get('num_key_value_heads') or heads),
      head_dim=int(c.get('head_dim') or c['hidden_size'] // heads),
      mlp_dim=int(c['intermediate_size']), rope_base=float(rope_base),
      norm_eps=float(c.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(c.get('tie_word_embeddings', False)), qkv_bias=family == 'qwen2')


def _neutral_name(name: str, arch: layout.Architecture):
  """The layout.py name of a checkpoint tensor, or None for one to skip."""
  if name in _GLOBAL:
    if name == 'lm_head.weight' and arch.tie_embeddings:
      return None  # some tied checkpoints also store the (identical) head
    return _GLOBAL[name]
  match = re.fullmatch(r'model\.layers\.(\d+)\.(.+)', name)
  if match and match.group(2) in _PER_LAYER and int(match.group(1)) < arch.num_layers:
    return f'{match.group(1)}.{_PER_LAYER[match.group(2)]}'
  if _IGNORED.fullmatch(name):
    return None
  raise ValueError(f'checkpoint tensor {name!r} has no place in a {arch.family} model of this '
                   'library (an unsupported architecture variant?)')


def _read_safetensors(files, arch, say) -> dict:
  try:
    import safetensors  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise cli.MissingPackageError("reading *.safetensors needs the `safetensors` package: "
                                  "pip install 'adaptive_depth[pretrained]'") from None
  tensors = {}
  for path in files:
    # The flax framework reads bfloat16, which numpy alone cannot.
    with safetensors.safe_open(path, framework='flax') as f:
      for name in f.keys():
        neutral = _neutral_name(name, arch)
        if neutral is not None:
          tensors[neutral] = np.asarray(f.get_tensor(name), np.float32)
    say(f'read {os.path.basename(path)}')
  return tensors


def from_hf_dir(path: str, progress: layout.Progress = None) -> layout.Imported:
  """Reads a Hugging Face directory. Returns Imported(config, params, tokenizer); the
  directory must hold config.json, one or more *.safetensors and tokenizer.json."""
  say = progress or (lambda message: None)
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise cli.PathError(f'{config_path} not found: is {path!r} a Hugging Face model '
                            'directory?')
  with open(config_path, encoding='utf-8') as f:
    arch = architecture(json.load(f), config_path)
  files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
  if not files:
    raise cli.PathError(f'no *.safetensors in {path} (PyTorch .bin checkpoints are not '
                            'supported: re-save with safe_serialization=True)')
  tokenizer_file = os.path.abspath(os.path.join(path, 'tokenizer.json'))
  if not os.path.isfile(tokenizer_file):
    raise cli.PathError(f'{tokenizer_file} not found: only fast (tokenizer.json) '
                            'tokenizers are supported')
  say(f'reading {path}: {arch.family}, {arch.num_layers} layers, width {arch.width}')
  tokenizer = bpe.load(tokenizer_file)
  config = layout.make_config(arch, tokenizer, tokenizer_file)
  tensors = _read_safetensors(files, arch, say)
  cfg = model_lib.ModelConfig.from_config(config.model)
  return layout.Imported(config, layout.to_params(arch, cfg, tensors, say), tokenizer)
