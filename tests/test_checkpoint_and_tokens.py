"""What checkpoints hold and what the optimizer and the tokenizer do with a parameter or a
text: weight decay by parameter kind, BOS where the tokenizer file adds it, parameters-only
loading and imported workdirs.

Tests of BPE tokenizers need the `tokenizers` package, and the comparisons with Hugging Face
transformers also `transformers` and `gguf`: pip install -e ".[parity]".
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import adaptive_depth as ad
from adaptive_depth import checkpoint as checkpoint_lib
from adaptive_depth import config_lib
from adaptive_depth import metrics as metrics_lib
from adaptive_depth import model as model_lib
from adaptive_depth import sharding
from adaptive_depth import data as data_lib
from adaptive_depth.data import pipeline
from adaptive_depth.train import state as state_lib
from tests import tiny_models

_EXTRA = 'pip install -e ".[parity]"'
TEXTS = ['the quick brown fox jumps over the lazy dog', 'to be, or not to be: that is the '
         'question', 'Numbers 12 345 and 6789!', 'héllo wörld'] * 5
PROBES = ['the fox', 'Hello, world!', '  two  spaces', '<s> written out', '']


def _hf_tokenizers():
  return pytest.importorskip('tokenizers', reason=f'needs the tokenizers package: {_EXTRA}')


def _transformers():
  return pytest.importorskip('transformers', reason=f'needs transformers: {_EXTRA}')


def _tiny_tokenizer(folder, *, post_bos: bool, config: dict | None):
  """A byte-level BPE trained on TEXTS in folder/tokenizer.json ('<s>' = 0, '</s>' = 1);
  post_bos: its post-processor puts '<s>' first (as Llama's does); config: the
  tokenizer_config.json beside it (None: no file). Returns the tokenizer.json path."""
  _hf_tokenizers()
  return tiny_models.tiny_bpe_tokenizer(folder, TEXTS, vocab_size=300, post_bos=post_bos,
                                        config=config)


# ------------------------------------------------------------------------- weight decay

def test_weight_decay_skips_biases_and_norm_scales():
  config = ad.load_config('configs/quickstart.py:tiny', {
      'model.qkv_bias': True, 'model.exit_norms': True, 'model.exit_adapter_rank': 4})
  cfg = model_lib.ModelConfig.from_config(config.model)
  params = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  mask = {jax.tree_util.keystr(k): v
          for k, v in jax.tree_util.tree_leaves_with_path(state_lib.decay_mask(params))}
  assert params['blocks']['attn']['q_bias'].ndim == 3  # [blocks, heads, head_dim]
  no_decay = {"['blocks']['attn']['q_bias']", "['blocks']['attn']['k_bias']",
              "['blocks']['attn']['v_bias']", "['blocks']['attn_norm']['scale']",
              "['blocks']['mlp_norm']['scale']", "['final_norm']['scale']",
              "['exit_heads']['norm']"}
  assert {k for k, decays in mask.items() if not decays} == no_decay
  assert {"['embed']['embedding']", "['blocks']['attn']['q']", "['blocks']['mlp']['down']",
          "['exit_heads']['adapter']['a']"} <= {k for k, decays in mask.items() if decays}

  # The optimizer itself: with zero gradients only decay moves a parameter.
  biased = {'blocks': {'attn': {'q_bias': jnp.ones((2, 2, 4)), 'q': jnp.ones((2, 8, 2, 4))}}}
  tx = state_lib.make_optimizer(config.train)
  opt_state = tx.init(biased)

  @jax.jit  # one program, not one per optimizer op
  def step(params, opt_state):
    updates, opt_state = tx.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(3):  # past the first step, whose warmup learning rate is 0
    biased, opt_state = step(biased, opt_state)
  assert np.all(np.asarray(biased['blocks']['attn']['q_bias']) == 1.0)
  assert np.all(np.asarray(biased['blocks']['attn']['q']) < 1.0)


# -------------------------------------------------------------------------------- BOS

@pytest.mark.pretrained
@pytest.mark.parametrize('post_bos,config', [
    (True, {'bos_token': '<s>', 'eos_token': '</s>', 'add_bos_token': True}),
    (True, None),  # the post-processor alone says so
    (False, {'bos_token': '<s>', 'eos_token': '</s>'}),
    # tokenizer_config.json alone says so: transformers runs the file's post-processor
    (False, {'bos_token': '<s>', 'eos_token': '</s>', 'add_bos_token': True}),
])
def test_bpe_encode_adds_bos_as_transformers_does(tmp_path, post_bos, config):
  transformers = _transformers()
  path = _tiny_tokenizer(tmp_path, post_bos=post_bos, config=config)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ours = data_lib.get_tokenizer('bpe', path, eos_id=1)
  assert ours.add_bos_token == post_bos and ours.bos_id == 0
  for text in PROBES:
    assert ours.encode(text) == theirs(text).input_ids, text
    assert (ours.encode(text)[:1] == [0]) == (post_bos or text.startswith('<s>')), text


@pytest.mark.pretrained
def test_bpe_tokenizer_saved_alone_keeps_adding_bos(tmp_path):
  path = _tiny_tokenizer(tmp_path, post_bos=True, config={'bos_token': '<s>',
                                                          'eos_token': '</s>'})
  tokenizer = data_lib.get_tokenizer('bpe', path)
  plain = tokenizer.tokenizer.encode('the fox', add_special_tokens=False).ids
  assert tokenizer.encode('the fox') == [0] + plain
  # Saved on its own (as launch/convert.py does), the file keeps adding BOS.
  saved = tmp_path / 'saved' / 'tokenizer.json'
  os.makedirs(saved.parent)
  tokenizer.save(str(saved))
  reread = data_lib.get_tokenizer('bpe', str(saved), bos_id=0, eos_id=1)
  hf = _hf_tokenizers()
  for text in PROBES:
    assert reread.encode(text) == tokenizer.encode(text)
    assert hf.Tokenizer.from_file(str(saved)).encode(text).ids == tokenizer.encode(text)


def _write_tokenizer_gguf(path, tokenizer_json: str, add_bos: bool):
  """A GGUF file holding only a tokenizer (the one in tokenizer_json) and its BOS flag."""
  gguf = pytest.importorskip('gguf', reason=f'needs the gguf package: {_EXTRA}')
  with open(tokenizer_json) as f:
    model = json.load(f)['model']
  tokens = sorted(model['vocab'], key=model['vocab'].get)
  writer = gguf.GGUFWriter(str(path), 'llama')
  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre('gpt2')
  writer.add_token_list(tokens)
  writer.add_token_types([3 if t in ('<s>', '</s>') else 1 for t in tokens])
  writer.add_token_merges([m if isinstance(m, str) else ' '.join(m) for m in model['merges']])
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(1)
  writer.add_add_bos_token(add_bos)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.pretrained
@pytest.mark.parametrize('add_bos', [True, False])
def test_gguf_add_bos_token_as_transformers_does(tmp_path, add_bos):
  transformers = _transformers()
  tokenizer_json = _tiny_tokenizer(tmp_path / 'json', post_bos=False, config=None)
  _write_tokenizer_gguf(tmp_path / 'tok.gguf', tokenizer_json, add_bos)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file='tok.gguf')
  ours = data_lib.get_tokenizer('bpe', str(tmp_path / 'tok.gguf'))
  assert ours.add_bos_token == add_bos
  for text in PROBES:
    assert ours.encode(text) == theirs(text).input_ids, text


@pytest.mark.pretrained
def test_packed_stream_starts_records_with_bos(tmp_path):
  path = _tiny_tokenizer(tmp_path, post_bos=True, config=None)
  tokenizer = data_lib.get_tokenizer('bpe', path, eos_id=1)
  records = ['the quick fox', 'to be', 'or not to be', 'lazy dog']
  plain = [tokenizer.tokenizer.encode(r, add_special_tokens=False).ids for r in records]
  expected = np.concatenate([[0] + ids + [1] for ids in plain])
  rows = pipeline.PackedBatches(records, tokenizer, batch_size=1, seq_len=7, seed=0,
                                shuffle=False, repeat=False)
  stream = np.concatenate(list(rows)).ravel()  # rows of seq_len + 1 = 8 tokens
  np.testing.assert_array_equal(stream, expected[:len(stream)])
  starts = np.concatenate([[0], np.cumsum([len(ids) + 2 for ids in plain])[:-1]])
  assert np.all(expected[starts] == 0) and stream.size > starts[2]

  byte_rows = pipeline.PackedBatches(records, data_lib.ByteTokenizer(), batch_size=1,
                                     seq_len=7, seed=0, shuffle=False, repeat=False)
  assert 256 not in np.concatenate(list(byte_rows))  # the byte tokenizer adds no BOS


# ------------------------------------------------------------- parameters-only restore

@pytest.fixture
def array_reads(monkeypatch) -> list[str]:
  """Names of the arrays Orbax reads from disk from now on."""
  names = []
  original = ocp.type_handlers.ArrayHandler.deserialize

  async def deserialize(self, infos, args=None):
    names.extend(info.name for info in infos)
    return await original(self, infos, args)

  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, 'deserialize', deserialize)
  return names


def _param_names(params) -> set[str]:
  """Orbax's names of the leaves of TrainState.params ('params.blocks.attn.q', ...)."""
  return {'params.' + '.'.join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(params)}


def _random_like(abstract, seed=0):
  """Random numpy arrays shaped as `abstract` (no initialiser to compile: tests stay fast)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(0.0, 0.1, x.shape).astype(x.dtype), abstract)


def _rules(config):
  return tuple(tuple(r) for r in config.sharding.rules)


def _training_workdir(workdir) -> state_lib.TrainState:
  """A workdir as a training run leaves it at step 3 (config.json and a full TrainState
  checkpoint with non-zero Adam moments); returns the state."""
  config = ad.load_config('configs/quickstart.py:tiny')
  cfg = model_lib.ModelConfig.from_config(config.model)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  tx = state_lib.make_optimizer(config.train)
  abstract, shardings = state_lib.state_shardings(cfg, tx, mesh, _rules(config))
  state = jax.tree.map(jax.device_put, _random_like(abstract), shardings)
  state = state.replace(step=jax.device_put(jnp.asarray(3, jnp.int32), shardings.step))
  os.makedirs(workdir)
  metrics_lib.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  checkpoints = checkpoint_lib.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                           async_save=False)
  checkpoints.save(3, state, {'epoch': 0})
  checkpoints.close()
  return state


@pytest.mark.parametrize('how', ['this orbax', 'empty transforms'])
def test_load_reads_only_the_parameters(tmp_path, array_reads, monkeypatch, how):
  if how == 'empty transforms':  # what orbax-checkpoint 0.11 is given
    monkeypatch.setattr(checkpoint_lib, 'partial_restore_kwargs', lambda: {'transforms': {}})
  state = _training_workdir(str(tmp_path / 'run'))
  array_reads.clear()
  loaded = ad.load(str(tmp_path / 'run'))
  assert loaded.step == 3
  assert set(array_reads) == _param_names(state.params)  # no 'opt_state.*', no 'step'
  assert jax.tree.structure(loaded.params) == jax.tree.structure(state.params)
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)


def test_training_checkpoint_still_resumes_whole(tmp_path):
  state = _training_workdir(str(tmp_path / 'run'))
  config = ad.load_config('configs/quickstart.py:tiny')
  cfg = model_lib.ModelConfig.from_config(config.model)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  tx = state_lib.make_optimizer(config.train)
  abstract, shardings = state_lib.state_shardings(cfg, tx, mesh, _rules(config))
  checkpoints = checkpoint_lib.Checkpoints(str(tmp_path / 'run' / 'checkpoints'))
  restored, data_state = checkpoints.restore(
      3, checkpoint_lib.abstract_with_shardings(abstract, shardings))
  checkpoints.close()
  assert data_state == {'epoch': 0} and int(restored.step) == 3
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def _imported(tmp_path) -> ad.convert.Imported:
  """A random 2-layer Llama-family model with a tiny BPE tokenizer, as importers return."""
  tokenizer = data_lib.get_tokenizer(
      'bpe', _tiny_tokenizer(tmp_path / 'source', post_bos=True, config=None), eos_id=1)
  arch = ad.convert.Architecture(
      family='llama', vocab_size=tokenizer.vocab_size, width=64, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16, mlp_dim=128, rope_base=10000.0, norm_eps=1e-5,
      tie_embeddings=True, qkv_bias=False)
  from adaptive_depth.convert import layout  # pylint: disable=g-import-not-at-top
  config = layout.make_config(arch, tokenizer, tokenizer.source)
  cfg = model_lib.ModelConfig.from_config(config.model)
  params = _random_like(jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0))))
  return ad.convert.Imported(config, params, tokenizer)


def _bytes_under(folder) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
             for f in files)


@pytest.mark.pretrained
def test_converted_workdir_holds_parameters_only_and_trains(tmp_path, array_reads):
  imported = _imported(tmp_path)
  workdir = str(tmp_path / 'converted')
  ad.convert.save_workdir(imported, workdir, source='tiny')
  checkpoint = os.path.join(workdir, 'checkpoints', '0')
  assert {n for n in os.listdir(checkpoint) if not n.startswith(('_', 'commit'))} == {
      'params', 'data'}
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(imported.params))
  on_disk = _bytes_under(checkpoint)
  assert on_disk < 1.5 * param_bytes, (on_disk, param_bytes)  # Adam moments would be 3x

  array_reads.clear()
  loaded = ad.load(workdir)
  assert loaded.step == 0 and len(array_reads) == len(jax.tree.leaves(imported.params))
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(imported.params)):
    np.testing.assert_array_equal(a, b)
  assert loaded.tokenizer.encode('the fox') == imported.tokenizer.encode('the fox')
  assert loaded.tokenizer.encode('the fox')[0] == loaded.tokenizer.bos_id == 0

  with pytest.raises(ValueError, match='parameters only.*config.train.init_from'):
    checkpoint_lib.Checkpoints(os.path.join(workdir, 'checkpoints')).restore(0, None)

  config = ad.load_config(os.path.join(workdir, 'config.py'))
  config.train.update(num_steps=2, batch_size=2, warmup_steps=1, log_every=1,
                      progress_bar=False)
  config.data.seq_len = 16
  config.eval.update(batch_size=2, num_batches=1)
  config.checkpoint.async_save = False
  # Training in the imported workdir itself would resume it: refused before anything is
  # written there.
  saved_config = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(ad.UserError, match='parameters only.*config.train.init_from'):
    ad.train_and_evaluate(config_lib.validate(config), workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == saved_config

  # A run started from it trains, with an optimizer state of its own.
  config.train.init_from = workdir
  summary = ad.train_and_evaluate(config_lib.validate(config), str(tmp_path / 'tuned'))
  assert summary['step'] == 2 and np.isfinite(summary['eval'][-1]['loss'])
  tuned = ad.load(str(tmp_path / 'tuned'))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tuned.params),
                                                      jax.tree.leaves(imported.params))]
  assert any(moved)
