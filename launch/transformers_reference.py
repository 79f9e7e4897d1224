"""The independent implementation launch/benchmark.py compares decode speed against: the
`transformers` library's own greedy `generate`, in PyTorch float32, on the same checkpoint
and prompt ids, when config.benchmark.transformers_source names a .gguf file or a Hugging
Face model directory.

The only PyTorch code of the project, so it stays beside the entry point, out of the
library. Needs the `parity` extra: pip install -e ".[parity]".
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np

from adaptive_depth import cli

_KEY = 'config.benchmark.transformers_source'


def load_transformers_model(source: str):
  """A float32 causal LM from a .gguf file or a directory with config.json + safetensors."""
  is_gguf = source.endswith('.gguf') and os.path.isfile(source)
  if not is_gguf and not os.path.isfile(os.path.join(source, 'config.json')):
    raise cli.PathError(f'{_KEY}={source!r}: allowed a .gguf file or a Hugging Face model '
                        'directory with config.json')
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise cli.UserError(f'{_KEY} needs {e.name}: pip install -e ".[parity]"') from None
  if is_gguf:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(source)), gguf_file=os.path.basename(source),
        dtype=torch.float32)
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
  return model.eval()


def time_greedy_generate(model, prompt: np.ndarray, max_new_tokens: int, repeats: int):
  """Greedy generation of exactly max_new_tokens after prompt [B, P] ids.

  Returns (tokens [B, max_new_tokens], median seconds over `repeats` after one warm-up).
  """
  import torch  # pylint: disable=g-import-not-at-top
  ids = torch.as_tensor(np.asarray(prompt, np.int64))
  kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                use_cache=True, attention_mask=torch.ones_like(ids),
                pad_token_id=model.config.eos_token_id)
  runs = []
  with torch.inference_mode():
    out = model.generate(ids, **kwargs)
    for _ in range(repeats):
      start = time.perf_counter()
      out = model.generate(ids, **kwargs)
      runs.append(time.perf_counter() - start)
  return out[:, ids.shape[1]:].numpy(), statistics.median(runs)


def greedy_generate(source: str):
  """The `transformers_generate` argument of benchmark.run_benchmark for `source`:
  (prompt [B, P], max_new_tokens, repeats) -> (tokens [B, max_new_tokens], median seconds)."""
  model = load_transformers_model(source)
  return lambda prompt, max_new_tokens, repeats: time_greedy_generate(
      model, prompt, max_new_tokens, repeats)
