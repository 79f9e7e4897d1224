"""Data: tokenizers, the bundled Tiny Shakespeare TFDS builder, packed LM batches.

Everything reads TFDS ArrayRecord files through numpy; TensorFlow is not needed.
"""
from adaptive_depth.data.pipeline import PackedBatches
from adaptive_depth.data.pipeline import load_text_source
from adaptive_depth.data.pipeline import make_train_and_eval_data
from adaptive_depth.data.tokenizers import ByteTokenizer
from adaptive_depth.data.tokenizers import get_tokenizer

__all__ = [
    'ByteTokenizer',
    'PackedBatches',
    'get_tokenizer',
    'load_text_source',
    'make_train_and_eval_data',
]
