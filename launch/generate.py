r"""Generates text: python launch/generate.py --config=configs/quickstart.py --workdir=DIR --prompt="To be".

Several --prompt flags make one batch. The model comes from DIR; decoding settings from
config.generate (override e.g. --config.generate.measure=softmax_diff
--config.generate.threshold=0.3). Each token is shown on a background coloured by the depth
it exited at; --html=FILE also writes an HTML rendering.
"""
from absl import flags
from ml_collections import config_flags

import adaptive_depth as ad
from adaptive_depth import cli
from adaptive_depth.decode import api as decode_api
from adaptive_depth.decode import render

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of a training run.')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'Prompt text (repeat for a batch).')
_HTML = flags.DEFINE_string('html', None, 'Also write an HTML rendering to this file.')
flags.mark_flags_as_required(['config', 'workdir', 'prompt'])
flags.register_validator('prompt', lambda prompts: prompts is None or all(prompts),
                         message='--prompt is empty: every --prompt needs text')


def main(argv):
  del argv  # cli.run refuses positional arguments
  config = ad.validate(_CONFIG.value)  # bad settings fail before the model loads
  decode_api.check_calibration(config.generate, _WORKDIR.value)
  model = ad.load(_WORKDIR.value)
  out = ad.generate_from_config(model, _PROMPT.value, config, workdir=_WORKDIR.value)
  layers = model.model_config.num_layers
  pages = []
  for prompt, tokens, depths in zip(_PROMPT.value, out.tokens, out.exit_depths):
    pieces = render.token_pieces(model.tokenizer, tokens)
    print(prompt + render.to_ansi(pieces, depths, layers) + '\n')
    pages.append(f'<p><b>{prompt}</b></p>' + render.to_html(pieces, depths, layers))
  print(render.ansi_legend(layers))
  print(', '.join(f'{k}: {v:.4g}' if isinstance(v, float) else f'{k}: {v}'
                  for k, v in out.stats.items()))
  if _HTML.value:
    with open(_HTML.value, 'w') as f:
      f.write('\n'.join(pages))


if __name__ == '__main__':
  cli.run(main)
