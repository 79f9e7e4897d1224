"""Generation: KV cache, prefill, per-row early-exit decoding, sampling."""
from adaptive_depth.decode.api import GenerateOutput, generate, generate_from_config
from adaptive_depth.decode.sampling import Greedy, Sampling
