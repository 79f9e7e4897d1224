r"""python launch/train.py --config=configs/exit_classifier.py --workdir=DIR

Second stage: train the learned exit classifier of an already-trained model in DIR.

The model (architecture and weights) comes from DIR; only the classifier trains, on labels
"this exit's argmax equals the last exit's", class-balanced. It is saved to
DIR/exit_classifier/ where `launch/evaluate.py` finds it.
"""
from adaptive_depth import config_lib


def get_config(variant: str = ''):
  config = config_lib.base_config()
  config.stage = 'exit_classifier'
  if variant == 'tiny':
    config.classifier.num_steps = 10
    config.classifier.batch_size = 4
  elif variant:
    raise config_lib.ConfigError(f"configs/exit_classifier.py: unknown variant {variant!r}; allowed: 'tiny'")
  return config
