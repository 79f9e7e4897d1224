"""The depth-wise batching engine: a slot table of requests at their own depths, refilled
between chunks of device ticks (continuous batching)."""
from adaptive_depth.serving.api import Engine
from adaptive_depth.serving.continuous_batching import ServeOutput, serve
from adaptive_depth.serving.engine import DecodeState, Prefix
