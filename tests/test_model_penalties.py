"""Model-wide regularizers/constraints, and the Keras parity training example."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn

# data of ordinary range: the overflow guard stays off here (conftest.py)
ORDINARY_DATA = True

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load_example(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_keras_parity_training_example_matches_keras_weights():
  example = _load_example("keras_parity_training")
  diffs, k_losses, j_losses = example.run(steps=4)
  np.testing.assert_allclose(j_losses, k_losses, rtol=2e-5)
  worst = max(diffs, key=diffs.get)
  assert diffs[worst] < 2e-4, (worst, diffs[worst])


def test_collect_layers_finds_paths_configs_and_ranks():
  example = _load_example("keras_parity_training")
  model = example.Net()
  x = jnp.ones((8, 64))
  variables = model.init(jax.random.PRNGKey(0), x)
  layers = jaxbn.collect_layers(model, variables, x)
  assert [layer.path for layer in layers] == [("bn_0",), ("bn_1",), ("bn_2",)]
  assert all(layer.input_rank == 2 for layer in layers)
  assert layers[1].config.renorm


def test_constrain_transform_lands_on_projected_params():
  example = _load_example("keras_parity_training")
  model = example.Net()
  x = jnp.ones((8, 64))
  variables = model.init(jax.random.PRNGKey(0), x)
  layers = jaxbn.collect_layers(model, variables, x)
  params = variables["params"]
  grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.3, params)
  tx = optax.chain(optax.sgd(1.0), jaxbn.constrain(layers))
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  expected = jaxbn.project(layers, optax.apply_updates(
      params, jax.tree_util.tree_map(lambda g: -g, grads)))
  for a, b in zip(jax.tree_util.tree_leaves(new),
                  jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # the constraint really acted: min_max_norm bounds gamma's norm by 1
  assert float(jnp.linalg.norm(new["bn_0"]["gamma"])) <= 1.0 + 1e-5
