"""The independent implementation launch/train_benchmark.py --torch compares the train step
against: the same architecture and step written directly in PyTorch (eager, float32), on the
same number of threads as XLA's CPU backend uses.

Architecture of config.model (decoder-only, pre-norm): token embedding; per layer RMSNorm ->
grouped-query attention with rotary embeddings (rotate-half form) and a causal mask through
`F.scaled_dot_product_attention` -> residual; RMSNorm -> SwiGLU MLP -> residual; at every exit
depth the shared final RMSNorm and the embedding-tied output projection give logits. Loss:
the mean over exits of next-token cross-entropy (uniform exit weights). Step: backward,
global-norm clipping, `torch.optim.AdamW`.

PyTorch code stays beside the entry points, out of the library. Needs the `parity` extra:
pip install -e ".[parity]".
"""
from __future__ import annotations

import importlib.util
import math
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from adaptive_depth import cli


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise cli.UserError(f'--torch needs {e.name}: pip install -e ".[parity]"') from None
  return torch


def build_model(model_config, seq_len: int, params=None):
  """The PyTorch model of config.model (no sharing, exits after every layer, tied
  embeddings: the quickstart's architecture; anything else is refused). Its forward(tokens
  [B, T], targets [B, T]) returns the multi-exit loss. params: this library's parameter
  pytree (numpy or jax arrays) to copy in, else PyTorch's own initialisation."""
  torch = _torch()
  nn, functional = torch.nn, torch.nn.functional
  m = model_config
  if (m.schedule != 'unshared' or m.num_blocks not in (0, m.num_layers) or
      m.exit_layers != 'all' or not m.tie_embeddings or m.lora_rank or m.exit_norms or
      m.exit_adapter_rank or m.qkv_bias):
    raise cli.UserError('--torch re-implements the quickstart architecture only (unshared '
                        "layers, config.model.exit_layers='all', tied embeddings, no LoRA, "
                        'exit norms, adapters or q/k/v biases)')
  torch.manual_seed(0)
  heads = m.num_heads
  kv_heads = m.num_kv_heads or heads
  head_dim = m.head_dim or m.width // heads

  class RMSNorm(nn.Module):
    def __init__(self):
      super().__init__()
      self.scale = nn.Parameter(torch.ones(m.width))

    def forward(self, x):
      return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.norm_eps) * self.scale

  inv_freq = 1.0 / (m.rope_base ** (torch.arange(0, head_dim, 2).float() / head_dim))
  angles = torch.arange(seq_len).float()[:, None] * inv_freq[None]
  cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

  def rotate(x):  # x: [B, H, T, hd]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

  class Layer(nn.Module):
    def __init__(self):
      super().__init__()
      self.attn_norm, self.mlp_norm = RMSNorm(), RMSNorm()
      self.q = nn.Linear(m.width, heads * head_dim, bias=False)
      self.k = nn.Linear(m.width, kv_heads * head_dim, bias=False)
      self.v = nn.Linear(m.width, kv_heads * head_dim, bias=False)
      self.o = nn.Linear(heads * head_dim, m.width, bias=False)
      self.gate = nn.Linear(m.width, m.mlp_dim, bias=False)
      self.up = nn.Linear(m.width, m.mlp_dim, bias=False)
      self.down = nn.Linear(m.mlp_dim, m.width, bias=False)

    def forward(self, x):
      b, t, _ = x.shape
      h = self.attn_norm(x)
      q = self.q(h).view(b, t, heads, head_dim).transpose(1, 2)
      k = self.k(h).view(b, t, kv_heads, head_dim).transpose(1, 2)
      v = self.v(h).view(b, t, kv_heads, head_dim).transpose(1, 2)
      q, k = rotate(q), rotate(k)
      if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
      a = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.o(a.transpose(1, 2).reshape(b, t, heads * head_dim))
      h = self.mlp_norm(x)
      return x + self.down(functional.silu(self.gate(h)) * self.up(h))

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(m.vocab_size, m.width)
      nn.init.normal_(self.embed.weight, std=m.init_std)
      self.layers = nn.ModuleList([Layer() for _ in range(m.num_layers)])
      self.final_norm = RMSNorm()

    def forward(self, tokens, targets):
      x = self.embed(tokens)
      losses = []
      for layer in self.layers:
        x = layer(x)
        logits = self.final_norm(x) @ self.embed.weight.T
        losses.append(functional.cross_entropy(logits.reshape(-1, m.vocab_size),
                                               targets.reshape(-1)))
      return torch.stack(losses).mean()

  model = Model()
  if params is not None:
    _copy_params(torch, model, params, m.num_layers)
  return model


def _copy_params(torch, model, params, num_layers: int):
  """This library's stacked parameters into the PyTorch modules (Linear weights are
  [out, in]; the library's projections are [in, ..., out-shaped])."""
  as_tensor = lambda x: torch.tensor(np.array(x, np.float32))
  blocks = params['blocks']
  with torch.no_grad():
    model.embed.weight.copy_(as_tensor(params['embed']['embedding']))
    model.final_norm.scale.copy_(as_tensor(params['final_norm']['scale']))
    for i, layer in enumerate(model.layers):
      attn, mlp = blocks['attn'], blocks['mlp']
      width = attn['q'].shape[1]
      for name in ('q', 'k', 'v'):
        getattr(layer, name).weight.copy_(as_tensor(attn[name][i]).reshape(width, -1).T)
      layer.o.weight.copy_(as_tensor(attn['o'][i]).reshape(-1, width).T)
      for name in ('gate', 'up', 'down'):
        getattr(layer, name).weight.copy_(as_tensor(mlp[name][i]).T)
      layer.attn_norm.scale.copy_(as_tensor(blocks['attn_norm']['scale'][i]))
      layer.mlp_norm.scale.copy_(as_tensor(blocks['mlp_norm']['scale'][i]))
  assert len(model.layers) == num_layers


def make_train_step(model_config, train_config, batch: np.ndarray, threads: int):
  """A no-argument callable running one PyTorch train step on `batch` ([B, T + 1] ids):
  multi-exit loss, backward, clipping, AdamW."""
  t = train_config
  same_step = {'train.exit_loss': (t.exit_loss, 'lm'),
               'train.exit_loss_weights': (t.exit_loss_weights, 'uniform'),
               'train.trainable': (t.trainable, 'all'),
               'train.loss_chunk_tokens': (t.loss_chunk_tokens, 0),
               'model.dtype': (model_config.dtype, 'float32'),
               'model.remat': (model_config.remat, False)}
  for key, (value, implemented) in same_step.items():
    if value != implemented:
      raise cli.UserError(f'--torch re-implements the step with config.{key}={implemented!r} '
                          f'only (got {value!r}): set it so both steps are the same')
  torch = _torch()
  torch.set_num_threads(threads)
  model = build_model(model_config, batch.shape[1] - 1)
  decay = [p for n, p in model.named_parameters() if 'norm' not in n]
  no_decay = [p for n, p in model.named_parameters() if 'norm' in n]
  optimizer = torch.optim.AdamW(
      [{'params': decay, 'weight_decay': t.weight_decay},
       {'params': no_decay, 'weight_decay': 0.0}],
      lr=t.learning_rate, betas=(t.b1, t.b2), eps=1e-8)
  tokens = torch.tensor(np.array(batch[:, :-1]), dtype=torch.long)
  targets = torch.tensor(np.array(batch[:, 1:]), dtype=torch.long)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = model(tokens, targets)
    loss.backward()
    if t.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_norm)
    optimizer.step()
    value = float(loss.detach())
    if not math.isfinite(value):
      raise RuntimeError(f'PyTorch reference step: loss {value}')

  return step


class SubprocessStep:
  """The PyTorch step run in a child process of its own, one step per call.

  A process of its own gives PyTorch its own heap and its own malloc settings: in one
  process with XLA, each framework's allocations fragment the heap the other reuses, and
  both then page-fault (adaptive_depth/host_memory.py). host_malloc is the child's
  ADAPTIVE_DEPTH_HOST_MALLOC: 'system' runs PyTorch as it runs by default (glibc's malloc
  defaults), 'keep' with the malloc settings this library makes at import. Calling the
  object runs one step in the child and waits for it (a pipe round trip, well under a
  millisecond, is all it adds)."""

  def __init__(self, model_config, train_config, batch: np.ndarray, threads: int,
               host_malloc: str):
    if importlib.util.find_spec('torch') is None:
      raise cli.UserError('--torch needs torch: pip install -e ".[parity]"')
    self._folder = tempfile.TemporaryDirectory()
    spec = os.path.join(self._folder.name, 'step.pkl')
    with open(spec, 'wb') as f:
      pickle.dump((model_config, train_config, np.asarray(batch), threads), f)
    env = dict(os.environ, ADAPTIVE_DEPTH_HOST_MALLOC=host_malloc)
    self._child = subprocess.Popen([sys.executable, os.path.abspath(__file__), spec],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                   text=True, bufsize=1)
    # The child's lines, read on a thread of their own so that waiting for one can time out.
    self._lines = queue.Queue()
    threading.Thread(target=self._read_lines, daemon=True).start()
    self._expect('ready')

  def _read_lines(self):
    for line in self._child.stdout:
      self._lines.put(line)
    self._lines.put('')  # end of output: the child has ended

  def _expect(self, word, timeout_seconds: float = 600.0):
    """Reads the child's stdout until the line `word`; a RuntimeError if the child ends,
    or is silent for timeout_seconds, first (its traceback is on stderr, above)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
      try:
        line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        line = None
      if line is None or line == '':
        self._stop()
        why = 'timed out' if line is None else 'ended'
        raise RuntimeError(f'PyTorch reference process {why} before {word!r} (its error, '
                           'if any, is above)')
      if line.strip() == word:
        return  # other lines are the child's own output

  def __call__(self):
    try:
      self._child.stdin.write('step\n')
      self._child.stdin.flush()
    except BrokenPipeError:
      self._stop()
      raise RuntimeError('PyTorch reference process ended (its error is above)') from None
    self._expect('done')

  def _stop(self):
    if self._child.poll() is None:
      self._child.kill()
    self._child.wait()
    self._folder.cleanup()

  def close(self):
    """Ends the child (EOF on its stdin) and removes its files."""
    if self._child.poll() is None:
      self._child.stdin.close()
      try:
        self._child.wait(timeout=60)
      except subprocess.TimeoutExpired:
        pass
    self._stop()


def _serve_steps(spec_path: str):
  """The child of SubprocessStep: builds the step, then runs one per 'step' line on stdin."""
  with open(spec_path, 'rb') as f:
    model_config, train_config, batch, threads = pickle.load(f)
  step = make_train_step(model_config, train_config, batch, threads)
  print('ready', flush=True)
  for line in sys.stdin:
    if line.strip() == 'step':
      step()
      print('done', flush=True)


if __name__ == '__main__':
  _serve_steps(sys.argv[1])
