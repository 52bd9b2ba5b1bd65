"""CI floor smoke test: the installed jaxbn (run from outside the source tree)
beside the lowest supported jax/jaxlib/flax.

JAX must keep working after ``import jaxbn``, whether or not the kernels
register, and a training step must match a NumPy float64 reference.
Usage: python floor_smoke.py [--expect-kernels yes|no|any]
"""
import argparse
import warnings

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--expect-kernels", default="any",
                    choices=("yes", "no", "any"))
args = parser.parse_args()

with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  import jax
  import jax.numpy as jnp
  import jaxbn
assert float((jnp.ones(3) + 1).sum()) == 6.0, "JAX broke after import jaxbn"
registered = jaxbn.cpu_kernels.available()
print(f"jax {jax.__version__}, jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else ''}"
      f" kernels registered: {registered}")
for w in caught:
  if "jaxbn" in str(w.message):
    print("warning:", w.message)
if args.expect_kernels != "any":
  assert registered == (args.expect_kernels == "yes"), registered

rng = np.random.RandomState(0)
x = rng.randn(16, 4, 4, 3).astype(np.float32) * 2 + 5
mask = rng.rand(16) > 0.25
config = jaxbn.BatchNormConfig(momentum=0.5)
params, state = jaxbn.init(config, x.shape)


def loss(params, state, x):
  y, new_state = jaxbn.apply(config, params, state, x, training=True,
                             mask=mask)
  return jnp.sum(jnp.where(mask[:, None, None, None], y * x, 0)), new_state


(value, new_state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
    params, state, jnp.asarray(x))
valid = x[mask].astype(np.float64)
mean, var = valid.mean((0, 1, 2)), valid.var((0, 1, 2))
n = valid.size // 3
np.testing.assert_allclose(new_state["moving_mean"], 0.5 * mean, rtol=1e-5)
np.testing.assert_allclose(new_state["moving_variance"],
                           0.5 + 0.5 * var * n / (n - 1), rtol=1e-5)
y = (valid - mean) / np.sqrt(var + 1e-3)
np.testing.assert_allclose(value, np.sum(y * valid), rtol=1e-4)
np.testing.assert_allclose(grads["beta"], valid.sum((0, 1, 2)), rtol=1e-4)

module = jaxbn.BatchNormalization(axis=1, renorm=True, virtual_batch_size=4)
variables = module.init(jax.random.PRNGKey(0), x)
out, updates = module.apply(variables, x, training=True,
                            mutable=["batch_stats"])
assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
print("floor smoke: training step equals the float64 reference")
