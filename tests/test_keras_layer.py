"""The Keras 3 layer (``jaxbn.keras.BatchNormalization``) on the JAX backend:
tf_keras' numbers over several ``train_on_batch`` steps (every weight and
moving statistic after each step, the inference output), masks as Keras
passes them, ``.keras`` round trips, ``synchronized=True`` under
``DataParallel`` on 8 devices, and a clear error on another backend.

Keras fixes its backend at import, and this test process imports Keras with
TensorFlow's: the JAX-backend tests run in a subprocess with
``KERAS_BACKEND=jax`` (``test_the_keras_3_layer_on_the_jax_backend``)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import keras_oracle

ON_JAX = os.environ.get("KERAS_BACKEND") == "jax"
jax_backend_only = pytest.mark.skipif(
    not ON_JAX, reason="runs in the KERAS_BACKEND=jax subprocess")
ORDINARY_DATA = True


@pytest.mark.long
def test_the_keras_3_layer_on_the_jax_backend():
  if ON_JAX:
    pytest.skip("this is the subprocess")
  from tests.conftest import FAST_COMPILE_FLAGS
  env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS=" ".join(
      ("--xla_force_host_platform_device_count=8",) + FAST_COMPILE_FLAGS))
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", __file__],
      capture_output=True, text=True, timeout=600, env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert "8 passed" in result.stdout, result.stdout[-2000:]


def test_another_keras_backend_gets_a_clear_error():
  if ON_JAX:
    pytest.skip("the JAX backend builds the layer")
  import keras
  from jaxbn.keras import BatchNormalization
  assert keras.backend.backend() != "jax"
  with pytest.raises(RuntimeError, match="KERAS_BACKEND=jax"):
    BatchNormalization()


def _models(kwargs, shape, seed=0):
  """A Keras 3 model with jaxbn's layer and a tf_keras one with Keras', the
  same random initial weights."""
  import keras
  import jaxbn.keras
  k2 = keras_oracle.keras()
  ours = keras.Sequential([keras.Input(shape[1:]),
                           jaxbn.keras.BatchNormalization(**kwargs)])
  theirs = k2.Sequential([k2.Input(shape[1:]),
                          k2.layers.BatchNormalization(**kwargs)])
  rng = np.random.default_rng(seed)
  values = {}
  for weight in theirs.layers[0].weights:
    name = weight.name.split("/")[-1].split(":")[0]
    value = (rng.uniform(0.5, 1.5, weight.shape) if name in (
        "gamma", "moving_variance") else rng.uniform(-1, 1, weight.shape))
    if name in ("moving_stddev", "renorm_stddev"):
      value = np.sqrt(values["moving_variance"])
    if name == "renorm_mean":
      value = values["moving_mean"]
    values[name] = value.astype(np.float32)
    weight.assign(values[name])
  for weight in ours.layers[0].weights:
    name = weight.path.split("/")[-1]
    if name in values:
      weight.assign(values[name].reshape(weight.shape))
  for model in (ours, theirs):
    model.compile(optimizer=(keras if model is ours else k2).optimizers.SGD(
        0.1), loss="mse")
  return ours, theirs


def _named(layer):
  return {getattr(w, "path", w.name).split("/")[-1].split(":")[0]:
          np.asarray(w.numpy() if hasattr(w, "numpy") else w.value)
          for w in layer.weights}


@jax_backend_only
@pytest.mark.parametrize("kwargs,shape", [
    ({"momentum": 0.9}, (16, 3, 3, 4)),
    ({"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.7,
                                          "dmax": 0.5},
      "renorm_momentum": 0.8, "momentum": 0.7}, (16, 5)),
    ({"virtual_batch_size": 4, "axis": [1, 3], "center": False},
     (16, 3, 2, 4)),
])
def test_train_on_batch_matches_tf_keras(kwargs, shape):
  ours, theirs = _models(kwargs, shape)
  rng = np.random.default_rng(1)
  for step in range(3):
    x = (rng.normal(size=shape) * 2 + 1).astype(np.float32)
    target = rng.normal(size=shape).astype(np.float32)
    # the training-mode output (each call updates both layers' statistics)
    keras_oracle.assert_close(np.asarray(ours(x, training=True)),
                              theirs(x, training=True).numpy(), 2e-4,
                              f"training output at step {step}")
    ours.train_on_batch(x, target)
    theirs.train_on_batch(x, target)
    want = _named(theirs.layers[0])
    got = _named(ours.layers[0])
    for name, value in want.items():
      keras_oracle.assert_close(got[name].reshape(value.shape), value, 2e-4,
                                f"{name} after step {step}")
  keras_oracle.assert_close(ours.predict(x, verbose=0),
                            theirs.predict(x, verbose=0), 2e-4, "inference")


@jax_backend_only
def test_masks_as_keras_passes_them():
  # Masking -> the layer: padded time steps are left out of the statistics
  import keras
  import jaxbn.keras
  k2 = keras_oracle.keras()
  shape = (8, 6, 3)
  rng = np.random.default_rng(2)
  x = (rng.normal(size=shape) + 1).astype(np.float32)
  x[:, 4:] = 0.0  # padding
  ours = keras.Sequential([keras.Input(shape[1:]), keras.layers.Masking(0.0),
                           jaxbn.keras.BatchNormalization(momentum=0.5)])
  theirs = k2.Sequential([k2.Input(shape[1:]), k2.layers.Masking(0.0),
                          k2.layers.BatchNormalization(momentum=0.5)])
  ours(x, training=True)
  theirs(x, training=True)
  got, want = _named(ours.layers[-1]), _named(theirs.layers[-1])
  keras_oracle.assert_close(got["moving_mean"], want["moving_mean"], 2e-4,
                            "moving_mean")
  np.testing.assert_allclose(got["moving_mean"],
                             0.5 * x[:, :4].reshape(-1, 3).mean(0), rtol=1e-5)


@jax_backend_only
def test_a_saved_model_loads_with_its_weights(tmp_path):
  import keras
  import jaxbn.keras
  model = keras.Sequential([
      keras.Input((4, 4, 3)), keras.layers.Conv2D(5, 3),
      jaxbn.keras.BatchNormalization(virtual_batch_size=2, renorm=True,
                                     fused=False, axis=[3],
                                     gamma_regularizer="l2")])
  model.compile(optimizer="sgd", loss="mse")
  x = np.random.default_rng(3).normal(size=(8, 4, 4, 3)).astype(np.float32)
  model.fit(x, np.zeros((8, 2, 2, 5), np.float32), epochs=2, verbose=0)
  path = str(tmp_path / "model.keras")
  model.save(path)
  again = keras.saving.load_model(path)
  layer = again.layers[-1]
  assert isinstance(layer, jaxbn.keras.BatchNormalization)
  assert layer.config == model.layers[-1].config
  np.testing.assert_array_equal(again.predict(x, verbose=0),
                                model.predict(x, verbose=0))


@jax_backend_only
def test_synchronized_under_data_parallel_is_the_global_batch():
  import jax
  import keras
  import jaxbn.keras
  x = np.random.default_rng(4).normal(size=(16, 6)).astype(np.float32) * 3
  target = np.zeros_like(x)

  def trained():
    model = keras.Sequential([keras.Input((6,)), jaxbn.keras.BatchNormalization(
        synchronized=True, momentum=0.5)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, target, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return _named(model.layers[0])

  one_device = trained()
  keras.distribution.set_distribution(
      keras.distribution.DataParallel(devices=jax.devices()))
  try:
    assert len(jax.devices()) == 8
    on_eight = trained()
  finally:
    keras.distribution.set_distribution(None)
  for name, value in one_device.items():
    np.testing.assert_allclose(on_eight[name], value, rtol=1e-5, atol=1e-6)


@jax_backend_only
def test_readme_blocks_for_the_jax_backend_run():
  from tests.test_readme import keras_jax_blocks
  blocks = keras_jax_blocks()
  assert blocks
  for line, code in blocks:
    exec(compile(code, line, "exec"), {"__name__": "readme"})  # noqa: S102


@jax_backend_only
def test_the_keras_3_example_trains_saves_and_loads(tmp_path):
  import importlib.util
  import pathlib
  path = (pathlib.Path(__file__).resolve().parent.parent / "examples" /
          "keras3_ghost_renorm.py")
  spec = importlib.util.spec_from_file_location("keras3_example", path)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  accuracy, same = example.main(epochs=2, out=str(tmp_path / "m.keras"))
  assert accuracy > 0.85 and same
