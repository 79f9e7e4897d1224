"""Mixture-of-Recursions in train mode: exactness against the plain recursive forward and an
independent numpy reference, tied weights, router losses, and bad configs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth import config_lib
from adaptive_depth import forward as forward_lib
from adaptive_depth import model as model_lib
from adaptive_depth import mor
from adaptive_depth import routers
from tests import mor_reference
from tests import tiny_models

RECURSIONS = 3


def mor_config(per_recursion: int = 2, **routing_fields) -> model_lib.ModelConfig:
  """Unique first and last layers around 3 recursions of `per_recursion` shared blocks."""
  fields = dict(routing='expert_choice', recursions=RECURSIONS,
                capacities=routers.default_capacities(RECURSIONS))
  fields.update(routing_fields)
  steps = 2 + RECURSIONS * per_recursion
  return tiny_models.config(num_layers=steps, num_blocks=2 + per_recursion,
                            schedule='middle_cycle', exit_depths=(steps,),
                            routing=routers.RoutingConfig(**fields))


def tokens(batch=2, length=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 258, (batch, length)), jnp.int32)


def test_full_capacity_pass_through_equals_the_plain_recursive_forward():
  cfg = mor_config(capacities=(1.0,) * RECURSIONS, gate='pass_through')
  params = tiny_models.random_params(cfg)
  got = forward_lib.forward_train(cfg, params, tokens())
  plain = dataclasses.replace(cfg, routing=None)
  plain_params = {k: v for k, v in params.items() if k != 'routers'}
  want = model_lib.forward_train(plain, plain_params, tokens())
  np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-5)
  # And the router really gates when it is not pass-through: the same model differs.
  gated = forward_lib.forward_train(dataclasses.replace(
      cfg, routing=dataclasses.replace(cfg.routing, gate='router')), params, tokens())
  assert np.abs(np.asarray(gated) - np.asarray(want)).max() > 1e-2


@pytest.mark.parametrize('routing,kv', [('expert_choice', 'recursion_wise'),
                                        ('expert_choice', 'shared'),
                                        ('token_choice', 'recursion_wise'),
                                        ('token_choice', 'shared')])
def test_routed_forward_equals_numpy_on_the_selected_tokens_only(routing, kv):
  cfg = mor_config(routing=routing, kv=kv, alpha=0.5)
  params = tiny_models.random_params(cfg, scale=0.3)
  x = tokens()
  out = forward_lib.forward_outputs(cfg, params, x)
  logits = model_lib.head_logits(cfg, params, out.exit_states[0])
  selected = np.asarray(out.routing.selected)
  if routing == 'expert_choice':  # capacities 12, 8, 4 of 12 tokens, nested
    np.testing.assert_array_equal(selected.sum(-1), [[12, 12], [8, 8], [4, 4]])
  assert np.all(selected[1:] <= selected[:-1])  # a recursion keeps a subset
  for row in range(x.shape[0]):
    want = mor_reference.mor_row_logits(params, np.asarray(x[row]), cfg.routing,
                                        cfg.num_blocks, cfg.norm_eps, cfg.rope_base)
    np.testing.assert_allclose(np.asarray(logits[row]), want, atol=2e-4, rtol=2e-4)


def test_one_copy_of_the_shared_blocks_and_every_recursion_reads_it(tmp_path):
  cfg = mor_config(capacities=(1.0,) * RECURSIONS, gate='pass_through')
  params = tiny_models.random_params(cfg)
  # One copy: the parameter tree holds num_blocks blocks (first, 2 shared, last), not steps.
  assert jax.tree.leaves(params['blocks'])[0].shape[0] == cfg.num_blocks == 4
  # Changing that copy (shared block 1) changes what every recursion computes: each
  # recursion run alone (mor's own per-recursion call) on the same input.
  changed = {**params, 'blocks': jax.tree.map(lambda p: p.at[1].multiply(1.5),
                                              params['blocks'])}
  x = tokens()
  h = model_lib.embed(cfg, params, x)
  positions = model_lib.default_positions(x)
  valid = jnp.ones(x.shape, bool)

  def recursion_output(p, r):
    per_step = model_lib.all_step_blocks(cfg, p)
    return np.asarray(mor._run_recursion(cfg, per_step, r, h, positions, valid, None)[0])

  for r in range(RECURSIONS):
    assert np.abs(recursion_output(params, r) - recursion_output(changed, r)).max() > 1e-3
  # And the recursions read the same copy: equal inputs give equal outputs.
  np.testing.assert_allclose(recursion_output(params, 0), recursion_output(params, 2),
                             atol=1e-6)
  # A checkpoint round trip keeps the one copy (and the routers).
  from adaptive_depth import checkpoint as checkpoint_lib
  checkpoints = checkpoint_lib.Checkpoints(str(tmp_path / 'checkpoints'), async_save=False)
  checkpoints.save_params(0, params, {})
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          params)
  restored = checkpoints.restore_params(0, abstract)
  checkpoints.close()
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_router_losses_and_gradients():
  """Expert choice: the BCE against an independent formula, and the router gets gradient.
  Token choice: MaxVio against its definition (forward only: one compile less)."""
  for routing in ('expert_choice', 'token_choice'):
    cfg = mor_config(per_recursion=1, routing=routing)
    params = tiny_models.random_params(cfg, scale=0.1)
    x = tokens()
    if routing == 'expert_choice':
      def loss(p):
        out = forward_lib.forward_outputs(cfg, p, x)
        return out.routing.aux_loss + jnp.mean(jnp.square(out.exit_states)) * 1e-3, out.routing

      (value, routing_out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
      assert np.isfinite(value)
      assert float(jnp.abs(grads['routers']['kernel']).sum()) > 0
    else:
      routing_out = jax.jit(lambda p: forward_lib.forward_outputs(cfg, p, x).routing)(params)
    m = routing_out.metrics
    np.testing.assert_allclose(m['selected_recursion_1'], 1.0)
    if routing == 'expert_choice':
      # BCE against an independent formula: -[y log s + (1 - y) log(1 - s)] over eligible.
      logits, sel = np.asarray(routing_out.logits, np.float64), np.asarray(routing_out.selected)
      eligible = np.concatenate([np.ones_like(sel[:1]), sel[:-1]])
      bce = np.where(sel, np.logaddexp(0, -logits), np.logaddexp(0, logits))
      want = np.mean([bce[r][eligible[r]].mean() for r in range(RECURSIONS)])
      np.testing.assert_allclose(m['router_bce'], want, rtol=1e-4)
    else:
      depth_logits = np.asarray(routing_out.logits, np.float64)
      share = np.bincount(depth_logits.argmax(-1).ravel(), minlength=RECURSIONS) / 24
      np.testing.assert_allclose(m['max_violation'], (share.max() - 1 / 3) * 3, atol=1e-5)


BAD = {
    'token_choice_shared_drops_recursion_1': (
        {'routing': 'token_choice', 'kv': 'shared', 'capacity_factor': 0.8},
        'config.model.mor.capacity_factor'),
    'increasing_capacities': ({'capacities': '0.5,1,0.5'}, 'config.model.mor.capacities'),
    'capacity_above_one': ({'capacities': '1,1.5,0.5'}, 'config.model.mor.capacities'),
    'capacity_zero': ({'capacities': '1,0.5,0'}, 'config.model.mor.capacities'),
    'wrong_recursions': ({'recursions': 2}, 'config.model.mor.recursions'),
    'unknown_router': ({'router': 'attention'}, 'config.model.mor.router'),
    'unknown_kv': ({'kv': 'global'}, 'config.model.mor.kv'),
    'unknown_routing': ({'routing': 'random'}, 'config.model.mor.routing'),
}


@pytest.mark.parametrize('name', sorted(BAD))
def test_bad_mor_config_names_the_key(name):
  config = ad.load_config('configs/mor.py:tiny')
  changes, key = BAD[name]
  for k, v in changes.items():
    config.model.mor[k] = v
  with pytest.raises(config_lib.ConfigError, match=key.replace('.', r'\.')):
    config_lib.validate(config)


def test_remat_and_entry_points_without_mor_are_refused(tmp_path):
  config = ad.load_config('configs/mor.py:tiny')
  config.model.remat = True
  with pytest.raises(config_lib.ConfigError, match=r'config\.model\.remat'):
    config_lib.validate(config)
  # Evaluate, calibrate and the decode benchmark refuse a MoR model before loading anything
  # (the workdir does not even exist).
  from adaptive_depth import benchmark, cli, evaluation
  from adaptive_depth.calibrate import calibration_run
  config = ad.load_config('configs/mor.py:tiny')
  missing = str(tmp_path / 'none')
  for call in (lambda: evaluation.evaluate_run(config, missing),
               lambda: calibration_run.calibrate_run(config, missing, measures=['max_prob'],
                                                     risk='textual', delta=0.1, epsilon=0.05),
               lambda: benchmark.run_benchmark(config, missing, str(tmp_path / 'b.json'))):
    with pytest.raises(cli.UserError, match='Mixture-of-Recursions'):
      call()


def test_routers_on_an_unshared_model_are_refused():
  config = ad.load_config('configs/mor.py:vanilla')
  config.model.mor.routing = 'expert_choice'
  config.model.mor.recursions = 3
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.schedule='unshared'"):
    config_lib.validate(config)


def test_mor_config_variants_train_on_equal_flops():
  """configs/mor.py's docstring: every variant's steps x FLOPs per token within 0.1%."""
  from adaptive_depth import costs
  budgets = {}
  for variant in ('', 'token_choice', 'kv_shared', 'recursive', 'vanilla'):
    config = config_lib.validate(ad.load_config(f'configs/mor.py:{variant}'))
    cfg = model_lib.ModelConfig.from_config(config.model)
    budgets[variant] = config.train.num_steps * costs.mor_flops_per_token(
        cfg, config.data.seq_len)
  values = np.asarray(list(budgets.values()))
  assert values.max() / values.min() < 1.001, budgets
  # The full-compute count is the plain model's: full_depth_flops at the mean causal context.
  config = ad.load_config('configs/mor.py:vanilla')
  cfg = model_lib.ModelConfig.from_config(config.model)
  np.testing.assert_allclose(costs.mor_flops_per_token(cfg, 128),
                             costs.full_depth_flops(cfg, 64.5))


def test_tiny_mor_trains_and_logs_its_routing(tmp_path):
  """configs/mor.py:tiny through the training loop: router metrics in metrics.jsonl and
  summary.json, the decision agreement on validation text, and still one copy of the
  shared block after training (loaded back from its checkpoint)."""
  import json
  config = ad.load_config('configs/mor.py:tiny')
  summary = ad.train_and_evaluate(config, str(tmp_path))
  assert summary['step'] == config.train.num_steps
  routing = summary['train_routing']
  np.testing.assert_allclose(routing['selected_recursion_1'], 1.0)
  np.testing.assert_allclose(routing['selected_recursion_3'], 8 / 24, atol=1e-5)  # ceil(24/3)
  assert routing['router_bce'] > 0 and np.isfinite(routing['router_loss'])
  evaluated = summary['eval_routing']
  assert len(evaluated['decision_agreement']) == 3
  assert all(0 <= a <= 1 for a in evaluated['decision_agreement'])
  # Recursion 1 trains at capacity 1 and decoding runs it for every token: full agreement.
  assert evaluated['decision_agreement'][0] == 1.0
  np.testing.assert_allclose(evaluated['selected'], [1.0, 16 / 24, 8 / 24], atol=1e-5)
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert any('routing' in r for r in records) and any('eval_routing' in r for r in records)
  loaded = ad.load(str(tmp_path))
  assert jax.tree.leaves(loaded.params['blocks'])[0].shape[0] == 3  # first, shared, last
  assert loaded.params['routers']['kernel'].shape == (3, config.model.width)


def test_mlp_router_routes_and_trains():
  """router='mlp': a hidden layer per router; the routing follows it and it gets gradient."""
  cfg = mor_config(per_recursion=1, router='mlp', router_hidden=8)
  params = tiny_models.random_params(cfg, scale=0.3)
  assert params['routers']['hidden'].shape == (RECURSIONS, cfg.width, 8)
  x = tokens()
  # The routing and the router gradient from one compiled program (op by op, the forward
  # compiled a program per op).
  def aux_loss(p):
    routing = forward_lib.forward_outputs(cfg, p, x).routing
    return routing.aux_loss, routing.logits

  grads, logits = jax.jit(jax.grad(aux_loss, has_aux=True))(params)
  h = model_lib.embed(cfg, params, x)
  # Router 1 reads the state after the first layer: recompute its logits by hand.
  first = jax.tree.map(lambda p: p[0], params['blocks'])
  h, _ = model_lib.apply_block(cfg, first, h, model_lib.default_positions(x),
                               layers_causal(x))
  r = params['routers']
  want = jax.nn.gelu(h @ r['hidden'][0]) @ r['kernel'][0]
  np.testing.assert_allclose(logits[0], want, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(grads['routers']['hidden']).sum()) > 0


def layers_causal(x):
  from adaptive_depth import layers
  positions = model_lib.default_positions(x)
  return layers.causal_mask(positions, positions)
