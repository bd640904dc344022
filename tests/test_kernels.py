"""Every CPU-tuned operation equals the standard one it replaces, in value and gradient (on CPU).

Short-sequence attention has a second written-out form, with the item axis last, which TPUs and GPUs run
(`attention._short_attention`): it is checked against `jax.nn.dot_product_attention` the same way.

`config.model.kernels` ("auto": CPU-tuned forms on CPU, standard Flax/JAX operations on TPU and GPU) selects
between each pair below; the model-level test checks that the whole loss and its gradients agree. Tolerances:
float32 results agree to 1e-5 relative (different summation orders), dropout masks bit for bit, and pixel draws
in distribution (both are exact samplers, with different samples for the same key).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from fractal_jax.model import attention, blocks, dropout, fractal, layers, model_config
from fractal_jax.sampling import draws

RTOL, ATOL = 1e-5, 1e-6


def _value_and_grads(fn, *args):
  """fn(*args) and its gradient with respect to every argument, for a scalar summary of the output."""
  return jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args))))(*args)


def _assert_close(a, b, rtol=RTOL, atol=ATOL):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol)


def _module_pair(make, x):
  """(cpu output and grads, standard output and grads) of `make(cpu_kernels)` on x with the same parameters."""
  params = make(False).init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
  return [_value_and_grads(lambda p, v, cpu=cpu: make(cpu).apply(p, v), params, x) for cpu in (True, False)]


def test_resolve_kernels_by_platform():
  assert model_config.resolve_kernels("auto", "cpu") == "cpu"
  assert model_config.resolve_kernels("auto", "tpu") == "standard"
  assert model_config.resolve_kernels("auto", "gpu") == "standard"
  assert model_config.resolve_kernels("cpu", "tpu") == "cpu"
  with pytest.raises(model_config.ConfigError, match="kernels"):
    model_config.resolve_kernels("fast")


def test_flattened_dense_equals_nn_dense():
  x = jax.random.normal(jax.random.key(2), (3, 5, 7))
  cpu, standard = _module_pair(
    lambda cpu: layers.dense(11, ("embed", "mlp"), jnp.float32, jnp.float32, cpu_kernels=cpu), x
  )
  _assert_close(cpu, standard)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, RTOL), (jnp.bfloat16, 2e-2)])
def test_written_out_layer_norm_gradient_equals_autodiff(dtype, rtol):
  x = (3.0 + 2.0 * jax.random.normal(jax.random.key(3), (4, 6, 32))).astype(dtype)
  cpu, standard = _module_pair(lambda cpu: layers.layer_norm(dtype, jnp.float32, cpu_kernels=cpu), x)
  _assert_close(cpu, standard, rtol=rtol, atol=rtol * 1e-1)


def test_erf_gelu_equals_nn_gelu():
  x = jnp.linspace(-6.0, 6.0, 101)
  cpu = _value_and_grads(lambda v: layers.gelu(v, cpu_kernels=True), x)
  standard = _value_and_grads(lambda v: layers.gelu(v, cpu_kernels=False), x)
  _assert_close(cpu, standard)


def test_fused_swiglu_equals_two_products():
  x = jax.random.normal(jax.random.key(4), (2, 5, 16))
  cpu, standard = _module_pair(lambda cpu: blocks.SwiGLU(16, jnp.float32, jnp.float32, cpu), x)
  _assert_close(cpu, standard)


def _qkv(length, keys_length=None, seed=5):
  shape = lambda n: (3, n, 4, 8)  # noqa: E731  [B, T, N, H]
  rng = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, shape(n)) for k, n in zip(rng, (length, keys_length or length, keys_length or length))]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cpu", [True, False])  # the CPU form, and the items-last form TPUs and GPUs run
def test_short_sequence_attention_equals_dot_product_attention(causal, cpu):
  for length in (1, 3, attention.SHORT_SEQUENCE):
    q, k, v = _qkv(length)
    short = _value_and_grads(lambda *a: attention.dot_product_attention(*a, causal=causal, cpu_kernels=cpu), q, k, v)
    _assert_close(short, _value_and_grads(lambda *a: jax.nn.dot_product_attention(*a, is_causal=causal), q, k, v))
  bf16 = [x.astype(jnp.bfloat16) for x in _qkv(3)]  # the mixed-precision path: float32 softmax, bfloat16 products
  _assert_close(
    attention.dot_product_attention(*bf16, causal=causal, cpu_kernels=cpu),
    jax.nn.dot_product_attention(*bf16, is_causal=causal),
    rtol=2e-2,
    atol=2e-2,
  )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [9, attention.ITEMS_LAST_KEYS + 3])  # the standard side: items last, or not
def test_dropout_attention_gradient_equals_autodiff(causal, length):
  q, k, v = _qkv(length)
  keep = jax.random.bernoulli(jax.random.key(6), 0.9, (3, 4, length, length))

  def attend(cpu):
    return lambda *a: attention.dot_product_attention(
      *a, causal=causal, dropout_keep=keep, keep_prob=0.9, cpu_kernels=cpu
    )

  _assert_close(_value_and_grads(attend(True), q, k, v), _value_and_grads(attend(False), q, k, v))


@pytest.mark.parametrize("shape", [(7,), (33, 17), (4, 3, 129)])
def test_unrolled_dropout_bits_equal_jax_bernoulli(shape):
  for seed in range(3):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(dropout.bernoulli(key, 0.9, shape), jax.random.bernoulli(key, 0.9, shape))


@pytest.mark.parametrize("cpu", [True, False])
def test_dropout_keeps_its_rate(cpu):
  rate, size = 0.1, 200_000
  x = jnp.ones((size,))
  out = dropout.Dropout(rate, cpu_kernels=cpu).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(7)})
  kept = np.asarray(out != 0)
  assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / size)
  np.testing.assert_allclose(np.asarray(out)[kept], 1 / (1 - rate), rtol=1e-6)  # kept values scaled by 1 / keep


@pytest.mark.parametrize("inverse_cdf", [True, False])
def test_pixel_draws_follow_the_softmax(inverse_cdf):
  """Both samplers draw each value with its softmax probability, and never a value of probability 0."""
  draws_per_item, vocab = 40_000, 256
  logits = 2.0 * jax.random.normal(jax.random.key(8), (vocab,))
  logits = logits.at[:16].set(-jnp.inf)  # impossible values
  keys = jax.random.split(jax.random.key(9), draws_per_item)
  ids = np.asarray(
    draws.channel_ids(jnp.broadcast_to(logits, (draws_per_item, vocab)), keys, 1, inverse_cdf=inverse_cdf)
  )
  probs = np.asarray(jax.nn.softmax(logits))
  counts = np.bincount(ids, minlength=vocab)
  assert counts[:16].sum() == 0
  expected = probs * draws_per_item
  spread = np.sqrt(expected * (1 - probs)) + 1.0
  assert np.all(np.abs(counts - expected) < 5 * spread)
  chi2 = float(np.sum((counts[16:] - expected[16:]) ** 2 / expected[16:]))
  assert chi2 < vocab - 16 + 6 * np.sqrt(2 * (vocab - 16))  # mean + 6 sigma of a chi-square with 239 dof


@pytest.mark.parametrize("family, train", [("ar_ar", False), ("mar_mar", True)])
def test_model_loss_and_gradients_agree_between_kernels(family, train):
  """The whole loss and its gradients with CPU-tuned and with standard operations.

  Dropout is off in the training case: with CPU kernels stacks of up to 8 blocks run as loops, whose per-layer
  dropout rngs differ from a scan's (both are valid dropout, not the same draws).
  """
  overrides = dict(attn_dropout=0.0, proj_dropout=0.0)
  cpu_settings = tiny_models.settings(family, kernels="cpu", **overrides)
  standard_settings = tiny_models.settings(family, kernels="standard", **overrides)
  params = tiny_models.init_params(cpu_settings)
  side = cpu_settings.img_size
  images = jax.random.normal(jax.random.key(10), (3, side, side, 3))
  labels = jnp.asarray([1, 0, 2])

  def loss(model_settings):
    model = fractal.build(model_settings)
    rngs = fractal.make_rngs(jax.random.key(11))
    loss_fn = lambda p: model.apply({"params": p}, images, labels, train=train, rngs=rngs)[0]  # noqa: E731
    return jax.jit(jax.value_and_grad(loss_fn))(params)

  _assert_close(loss(cpu_settings), loss(standard_settings), rtol=1e-4, atol=1e-5)


def test_standard_kernels_keep_known_modules_and_names():
  """Both kernel choices build the same parameter tree (checkpoints move freely between backends)."""
  shapes = [
    jax.tree.map(lambda a: a.shape, fractal.abstract_params(tiny_models.settings("mar_guiding_4", kernels=k)))
    for k in ("cpu", "standard")
  ]
  assert shapes[0] == shapes[1]
  assert isinstance(layers.dense(4, ("embed", "mlp"), jnp.float32, jnp.float32), nn.Dense)
