"""The independent implementation decode speed is compared against: the `transformers`
library's own greedy `generate`, in PyTorch float32, on the same checkpoint and prompt ids.

Needs the `parity` extra (pip install -e ".[parity]"); used by launch/benchmark.py when
config.benchmark.transformers_source names a GGUF file or a Hugging Face directory.
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np


def load_transformers_model(source: str):
  """A float32 causal LM from a .gguf file or a directory with config.json + safetensors."""
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ImportError(f'config.benchmark.transformers_source needs {e.name}: '
                      'pip install -e ".[parity]"') from None
  if source.endswith('.gguf'):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(source)), gguf_file=os.path.basename(source),
        dtype=torch.float32)
  elif os.path.isdir(source):
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
  else:
    raise FileNotFoundError(f'config.benchmark.transformers_source={source!r}: expected a '
                            '.gguf file or a directory with config.json')
  return model.eval()


def time_greedy_generate(model, prompt: np.ndarray, max_new_tokens: int, repeats: int):
  """Greedy generation of exactly max_new_tokens after prompt [B, P] ids.

  Returns (tokens [B, max_new_tokens], median seconds over `repeats` after one warm-up).
  """
  import torch
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
