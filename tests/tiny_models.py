"""Tiny models and references shared by the tests: configs, random parameters, and full-depth
greedy decoding by re-running the whole sequence (no KV cache), the reference every decode
path is checked against."""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import exits
from adaptive_depth import model as model_lib

NUM_LAYERS = 4

# The model's entry points jitted, one program per config (static) and shapes, shared by the
# test modules: called eagerly they compile a program per operation.
forward_train = jax.jit(model_lib.forward_train, static_argnums=0)
init_params = jax.jit(model_lib.init_params, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def exit_max_probs(cfg: model_lib.ModelConfig, params, tokens):
  """Every exit's max-prob over tokens [B, T]: [E, B, T], in one program (tests pick a
  threshold as a quantile of these)."""
  return exits.max_prob(model_lib.forward_train(cfg, params, tokens))


def random_tokens(shape, vocab_size, seed=3):
  """Token ids [*shape] int32, drawn with numpy and cast there: jax.random, or a cast by
  jnp, compiles a program per shape."""
  ids = np.random.default_rng(seed).integers(0, vocab_size, shape)
  return jax.device_put(ids.astype(np.int32))


def config(**overrides) -> model_lib.ModelConfig:
  """A 4-step byte-vocabulary model with an exit after every step (overrides: any field)."""
  fields = dict(vocab_size=258, width=48, num_layers=NUM_LAYERS, num_blocks=NUM_LAYERS,
                schedule='unshared', num_heads=2, num_kv_heads=1, head_dim=24, mlp_dim=96,
                exit_depths=tuple(range(1, NUM_LAYERS + 1)))
  fields.update(overrides)
  return model_lib.ModelConfig(**fields)


def random_params(cfg: model_lib.ModelConfig, seed: int = 0, scale: float = 0.3):
  """Non-trivial values everywhere, so no term hides at its initialisation: norm scales
  around 1, every other leaf N(0, scale^2) (LoRA 'b' factors and exit-head adapters
  included, so relaxed models and exit heads really act). Drawn with numpy on eval_shape's
  shapes: initialising with jax ops compiles a program per leaf shape."""
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  values = [(1.0 if 'norm' in jax.tree_util.keystr(path) else 0.0)
            + scale * rng.standard_normal(x.shape).astype(np.float32) for path, x in leaves]
  return jax.tree.unflatten(tree, [jnp.asarray(v, jnp.float32) for v in values])


def padded_prompts(prompts) -> tuple[np.ndarray, np.ndarray]:
  """Ragged prompts (lists of ids) -> left-aligned [B, P] int32 (pad 0) and lengths [B]."""
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  prompt = np.zeros((len(prompts), lengths.max()), np.int32)
  for row, ids in enumerate(prompts):
    prompt[row, :len(ids)] = ids
  return prompt, lengths


def greedy_reference(cfg: model_lib.ModelConfig, params, prompts, steps: int,
                     exit_index: int = -1) -> np.ndarray:
  """Full-depth greedy continuation of each ragged prompt, [B, steps]: for every new token
  the whole sequence goes through forward_train (train mode, no cache) and each row reads
  an exit's argmax at its own last position: the first token the last exit's (as a
  full-depth prefill gives it), every later one exit `exit_index`'s (default the last; an
  early exit's logits never depend on deeper layers, so this is decoding with every token
  forced out there). Rows never interact, so one batch serves all of them; the loop runs
  on device (one program, one transfer)."""
  prompt, lengths = padded_prompts(prompts)
  buffer = np.zeros((len(prompts), prompt.shape[1] + steps), np.int32)
  buffer[:, :prompt.shape[1]] = prompt
  return np.asarray(_greedy_program(cfg, steps, exit_index)(
      params, jnp.asarray(buffer), jnp.asarray(lengths)))


@functools.lru_cache(maxsize=None)
def _greedy_program(cfg, steps, exit_index):
  def run(params, buffer, lengths):
    rows = jnp.arange(buffer.shape[0])

    def step(i, carry):
      buffer, out = carry
      exit_logits = model_lib.forward_train(cfg, params, buffer)  # [E, B, L, V]
      logits = jnp.where(i == 0, exit_logits[-1], exit_logits[exit_index])
      new = jnp.argmax(logits[rows, lengths + i - 1], -1).astype(jnp.int32)
      return buffer.at[rows, lengths + i].set(new), out.at[:, i].set(new)

    out = jnp.zeros((buffer.shape[0], steps), jnp.int32)
    return jax.lax.fori_loop(0, steps, step, (buffer, out))[1]
  return jax.jit(run)


def tiny_bpe_tokenizer(folder, texts, *, vocab_size: int, post_bos: bool = False,
                       config: dict | None = None) -> str:
  """A byte-level BPE ('<s>' = 0, '</s>' = 1) trained on `texts`, written as
  folder/tokenizer.json; post_bos: its post-processor puts '<s>' first (as Llama's does);
  config: the tokenizer_config.json beside it (None: no file). Needs the `tokenizers`
  package (callers skip without it). Returns the tokenizer.json path."""
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  tok.train_from_iterator(texts, hf.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=['<s>', '</s>'], show_progress=False,
      initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet()))
  if post_bos:
    tok.post_processor = hf.processors.TemplateProcessing(
        single='<s> $A', pair='<s> $A <s>:1 $B:1', special_tokens=[('<s>', 0)])
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, 'tokenizer.json')
  tok.save(path)
  if config is not None:
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
      json.dump(config, f)
  return path


def save_workdir(path: str, config_name: str, seed: int = 0, scale: float = 0.4) -> str:
  """A workdir holding the model of `config_name` (e.g. 'configs/shared_exit.py:tiny') with
  random parameters, saved as launch/convert.py leaves one (config.json, parameters only)."""
  from adaptive_depth import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from adaptive_depth import config_loading  # pylint: disable=g-import-not-at-top
  from adaptive_depth import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(config_name)
  cfg = model_lib.ModelConfig.from_config(config.model)
  os.makedirs(path)
  metrics_lib.write_json(os.path.join(path, 'config.json'), config.to_dict())
  checkpoints = checkpoint_lib.Checkpoints(os.path.join(path, 'checkpoints'), async_save=False)
  checkpoints.save_params(0, random_params(cfg, seed=seed, scale=scale), {})
  checkpoints.close()
  return path
