"""`ad.generate` / `generate_from_config`: argument checking, prompt forms, forced exits and
the learned exit classifier, on a tiny random byte-level model (exits at depths 2 and 3)."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth import config_lib
from adaptive_depth import depth as depth_lib
from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth import saved_model
from adaptive_depth.decode import adaptive_decode
from adaptive_depth.decode import api as decode_api
from adaptive_depth.decode import generation
from adaptive_depth.decode import sampling as sampling_lib
from adaptive_depth.train import classifier as classifier_lib
from tests import compile_counter
from tests import tiny_models

TEXTS = ['To be', 'KING:\n']
MAX_NEW = 8
EXIT_DEPTHS = (2, 3)


def _config(**generate):
  c = config_lib.base_config()
  c.model.update(width=32, num_heads=2, num_kv_heads=1, mlp_dim=64, num_layers=3,
                 exit_layers='2,3')
  c.generate.update(max_new_tokens=MAX_NEW, **generate)
  return c


@pytest.fixture(scope='module')
def model():
  """Numpy draws on eval_shape's shapes (norm scales near 1), large enough that the
  greedy continuations are not degenerate."""
  config = _config()
  cfg = model_lib.ModelConfig.from_config(config.model)
  assert cfg.exit_depths == EXIT_DEPTHS
  return saved_model.from_params(tiny_models.random_params(cfg, scale=0.4), config)


@pytest.fixture(scope='module')
def exit_2_reference(model):
  """Per text, greedy tokens with every decode step leaving at depth 2, by re-running the
  whole sequence: the first token from the last exit (the full-depth prefill), each later
  one from forward_train's logits at the depth-2 exit. The layers below an exit never read
  deeper K/V, so those logits do not depend on what the skipped layers hold."""
  cfg, eos_id = model.model_config, model.tokenizer.eos_id
  tokens = tiny_models.greedy_reference(cfg, model.params,
                                        [model.tokenizer.encode(t) for t in TEXTS], MAX_NEW,
                                        exit_index=EXIT_DEPTHS.index(2))
  references = []
  for row in tokens.tolist():  # up to and including the first EOS, as generate stops
    out = row[:row.index(eos_id) + 1] if eos_id in row else row
    assert len(set(out)) > 2, 'the reference is degenerate; the test would prove little'
    references.append(out)
  return references


# ------------------------------------------------------------------------- forced exits


@pytest.mark.parametrize('kv', generation.KV_POLICIES)
def test_exit_at_forces_every_decode_step_out_under_measure_never(model, exit_2_reference, kv):
  """Every decode step leaves at depth 2 and emits the depth-2 exit's greedy token, under
  either KV policy (the queue of 'parallel' holds every token here)."""
  out = ad.generate(model, TEXTS, max_new_tokens=MAX_NEW, kv=kv, queue_capacity=MAX_NEW,
                    exit=ad.ExitPolicy(measure='never', exit_at=2))
  for depths in out.exit_depths:
    assert depths[0] == 3 and set(depths[1:]) == {2}, depths  # the first: the prefill
  assert out.tokens == exit_2_reference
  assert out.stats['mean_depth'] == 2.0
  # 'propagate' skips the deeper layers; 'parallel' runs them later, when the queue catches up.
  assert (out.stats['relative_flops'] < 1) == (kv == 'propagate'), out.stats


def test_exit_at_must_be_an_exit_depth(model):
  cfg, params = model.model_config, model.params
  tokens = jnp.asarray([model.tokenizer.encode(TEXTS[0])])
  prompt, lengths = adaptive_decode.pad_prompts(tokens.tolist(), pad_id=0)
  for bad in (1, 4, -1):
    shown = (rf'ExitPolicy\.exit_at={bad} .*allowed: 0 \(off\) or one of its exit depths '
             r'\[2, 3\]')
    policy = ad.ExitPolicy(measure='max_prob', exit_at=bad)
    with pytest.raises(ValueError, match=shown):
      depth_lib.forward_adaptive(cfg, params, tokens, policy)
    with pytest.raises(ValueError, match=shown):
      ad.generate(model, TEXTS, max_new_tokens=MAX_NEW, exit=policy)
    with pytest.raises(ValueError, match=shown):
      generation.generate_tokens(
          cfg, params, prompt, lengths, max_new_tokens=2, policy=policy,
          sampling=sampling_lib.Greedy(), rng=jax.random.key(0), eos_id=-1, pad_id=0)
  # Inside a program exit_at is traced, so nothing can be checked: the check is not kept.
  jax.eval_shape(lambda policy: depth_lib.forward_adaptive(cfg, params, tokens, policy),
                 ad.ExitPolicy(measure='max_prob', exit_at=1))


def test_exit_at_overrides_min_depth(model, exit_2_reference):
  out = ad.generate(model, TEXTS, max_new_tokens=MAX_NEW,
                    exit=ad.ExitPolicy(measure='never', exit_at=2, min_depth=3))
  assert [set(d[1:]) for d in out.exit_depths] == [{2}, {2}]
  assert out.tokens == exit_2_reference


# ------------------------------------------------------------------- the exit classifier


def test_generate_from_config_loads_the_saved_exit_classifier(model, tmp_path):
  cfg = model.model_config
  classifier = jax.jit(exits.init_classifier, static_argnums=(1, 2))(  # one program
      jax.random.key(3), cfg.width + 3 + len(cfg.exit_depths), 8)  # hidden=8
  config = _config(measure='classifier', threshold=0.5)
  missing = re.escape(f'{tmp_path}/exit_classifier/params') + '.*configs/exit_classifier.py'
  with pytest.raises(FileNotFoundError, match=missing):
    ad.generate_from_config(model, TEXTS, config, workdir=str(tmp_path))
  with pytest.raises(ValueError, match='workdir='):
    ad.generate_from_config(model, TEXTS, config)

  classifier_lib.save_classifier(str(tmp_path), classifier)  # as the classifier stage does
  out = ad.generate_from_config(model, TEXTS, config, workdir=str(tmp_path))
  want = ad.generate(model, TEXTS, max_new_tokens=MAX_NEW, classifier=classifier,
                     exit=ad.ExitPolicy(measure='classifier', threshold=0.5))
  assert out.tokens == want.tokens and out.exit_depths == want.exit_depths
  assert 2 in sum((d[1:] for d in out.exit_depths), []), 'the classifier let no token exit'


def test_generate_from_config_validates_the_config_first(model):
  with pytest.raises(config_lib.ConfigError, match='config.generate.top_p'):
    ad.generate_from_config(model, TEXTS, _config(temperature=1.0, top_p=0.0))


# ---------------------------------------------------------------------- argument checks


@pytest.fixture
def no_held_programs(monkeypatch):
  """ad.generate's program cache empty for the test: a check made after the program is
  fetched would then compile, which compile_counter sees."""
  monkeypatch.setattr(decode_api, '_PROGRAMS', {})


@pytest.mark.parametrize('sampling,shown', [
    (ad.Sampling(temperature=-0.5), r'Sampling\.temperature=-0\.5: must be >= 0'),
    (ad.Sampling(top_p=0.0), r'Sampling\.top_p=0\.0: must be in \(0, 1\]'),
    (ad.Sampling(top_p=1.5), r'Sampling\.top_p=1\.5: must be in \(0, 1\]'),
    (ad.Sampling(top_k=-1), r'Sampling\.top_k=-1: must be an int >= 0'),
    (ad.Sampling(top_k=2.5), r'Sampling\.top_k=2\.5: must be an int >= 0'),
])
def test_sampling_knobs_out_of_range_are_refused(model, sampling, shown, no_held_programs):
  with compile_counter.backend_compiles() as compiles, pytest.raises(ValueError, match=shown):
    ad.generate(model, TEXTS, max_new_tokens=MAX_NEW, sampling=sampling)
  assert compiles == []


@pytest.mark.parametrize('seed', [-1, 1.5, True, 2**63])
def test_bad_seed_is_refused_before_compiling(model, seed, no_held_programs):
  with compile_counter.backend_compiles() as compiles, pytest.raises(
      ValueError, match=rf'seed={seed!r}: must be an int in 0\.\.2\*\*63-1'):
    ad.generate(model, TEXTS, max_new_tokens=MAX_NEW, seed=seed)
  assert compiles == []


def test_speculative_takes_any_pair_of_ints(model):
  want = ad.generate(model, TEXTS, max_new_tokens=MAX_NEW, speculative=(2, 3)).tokens
  assert ad.generate(model, TEXTS, max_new_tokens=MAX_NEW, speculative=[2, 3]).tokens == want
  assert ad.generate(model, TEXTS, max_new_tokens=MAX_NEW,
                     speculative=np.asarray([2, 3])).tokens == want
  for bad in ('2x3', (2,), (2, 3, 1), (2.0, 3), (True, 3), 2):
    with pytest.raises(ValueError, match=r'speculative=.*expected two ints'):
      ad.generate(model, TEXTS, max_new_tokens=MAX_NEW, speculative=bad)


# ------------------------------------------------------------------------ prompt forms


def test_token_id_prompts_equal_the_text_they_encode(model):
  ids = [model.tokenizer.encode(t) for t in TEXTS]
  want = ad.generate(model, TEXTS, max_new_tokens=MAX_NEW)
  for prompts in (ids, [np.asarray(i, np.int32) for i in ids]):
    out = ad.generate(model, prompts, max_new_tokens=MAX_NEW)
    assert out.tokens == want.tokens and out.texts == want.texts


@pytest.mark.parametrize('prompts,error,shown', [
    ([], ValueError, 'prompts is empty'),
    (['To be', ''], ValueError, r'prompts\[1\] is an empty string'),
    ([[5, 6], []], ValueError, r'prompts\[1\] is empty'),
    ([[5, 258]], ValueError, r'prompts\[0\] holds token id 258; allowed: 0\.\.257'),
    ([[-1, 5]], ValueError, r'prompts\[0\] holds token id -1'),
    (['To be', [5, 6]], TypeError, 'prompts mixes strings and token ids'),
    ([[5.0, 6.0]], TypeError, r'prompts\[0\]='),
    ([np.zeros((1, 3), np.int32)], TypeError, r'prompts\[0\]='),
    ('To be', TypeError, 'list of strings'),
])
def test_bad_prompts_are_refused(model, prompts, error, shown):
  with pytest.raises(error, match=shown):
    ad.generate(model, prompts, max_new_tokens=MAX_NEW)


def test_empty_text_is_refused_also_when_the_tokenizer_adds_bos(model):
  """An empty string is no prompt even when its encoding is not empty (a BOS)."""
  tokenizer = model.tokenizer

  class WithBos:
    eos_id = tokenizer.eos_id
    encode = staticmethod(lambda text: [tokenizer.bos_id] + tokenizer.encode(text))
    decode = staticmethod(tokenizer.decode)

  with pytest.raises(ValueError, match=r'prompts\[0\] is an empty string'):
    ad.generate(dataclasses.replace(model, tokenizer=WithBos()), [''], max_new_tokens=MAX_NEW)


def test_text_prompts_get_the_tokenizers_bos_and_token_ids_nothing(model):
  tokenizer = model.tokenizer

  class WithBos:  # a tokenizer whose file says BOS goes first
    eos_id, bos_id, add_bos_token = tokenizer.eos_id, tokenizer.bos_id, True
    encode = staticmethod(lambda text: [tokenizer.bos_id] + tokenizer.encode(text))
    decode = staticmethod(tokenizer.decode)

  with_bos = dataclasses.replace(model, tokenizer=WithBos())
  ids = [tokenizer.encode(t) for t in TEXTS]
  from_text = ad.generate(with_bos, TEXTS, max_new_tokens=MAX_NEW)
  assert from_text.tokens == ad.generate(model, [[tokenizer.bos_id] + i for i in ids],
                                         max_new_tokens=MAX_NEW).tokens
  from_ids = ad.generate(with_bos, ids, max_new_tokens=MAX_NEW)
  assert from_ids.tokens == ad.generate(model, ids, max_new_tokens=MAX_NEW).tokens
  assert from_ids.tokens != from_text.tokens  # the BOS changes the continuation
