"""adaptive_depth: language models whose depth adapts per token, in JAX/Flax.

    import adaptive_depth as ad
    config = ad.load_config('configs/quickstart.py')
    ad.train_and_evaluate(config, '/tmp/quickstart')

Importing the package first sets glibc's malloc to keep freed memory mapped and has jax run
CPU programs inline, so XLA's per-step temporary buffers stop page-faulting (host_memory.py;
ADAPTIVE_DEPTH_HOST_MALLOC=system opts out of both, JAX_CPU_ENABLE_ASYNC_DISPATCH set by the
user is left as it is). Import it before running anything on jax for that to take effect.
"""
from adaptive_depth import host_memory

host_memory.keep_freed_memory()  # before anything below creates jax's CPU backend

from adaptive_depth.cli import PathError, UserError
from adaptive_depth.config_lib import ConfigError, base_config, validate
from adaptive_depth.config_loading import load_config
from adaptive_depth import convert  # ad.convert.from_gguf / from_hf_dir / convert
from adaptive_depth.decode import GenerateOutput, Greedy, Sampling, generate, generate_from_config
from adaptive_depth.depth import AdaptiveOutput, forward_adaptive
from adaptive_depth.evaluation import evaluate_run
from adaptive_depth.exits import ExitPolicy
from adaptive_depth.forward import ForwardOutput, forward_outputs, forward_train
from adaptive_depth.model import ModelConfig, init_params
from adaptive_depth.saved_model import LoadedModel, load
from adaptive_depth.serving import Engine, ServeOutput, serve
from adaptive_depth.jobs import train_and_evaluate

__version__ = '0.1.0'
