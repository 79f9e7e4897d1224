"""adaptive_depth: language models whose depth adapts per token, in JAX/Flax."""
import setuptools

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
        'jax>=0.5.0,<0.12',
        'flax>=0.10.4,<0.14',
        'optax>=0.2.4,<0.4',
        'orbax-checkpoint>=0.11.0,<0.13',
        'ml_collections>=0.1.1,<2',
        'tensorflow-datasets>=4.9.4,<5',
        'array_record>=0.5.0',
        'absl-py>=1.0',
        'numpy>=1.26',
        'tqdm>=4.60',
        'tensorboardX>=2.6',
        'matplotlib>=3.7',
    ],
    extras_require={
        'test': ['pytest>=7', 'nbclient>=0.9', 'nbformat>=5.9', 'ipykernel>=6'],
    },
)
