"""The training step: the loss decreases, and a resumed run repeats an uninterrupted one."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from fractal_jax.model import fractal, model_config
from fractal_jax.train import compaction, optimizer, train_step


@pytest.fixture(scope="module")
def tiny_step(tiny_config):
  s = model_config.settings(tiny_config.model)
  model = fractal.build(s)
  opt = optimizer.make_optimizer(optimizer.learning_rate_schedule(3e-3, warmup_steps=5, total_steps=200))
  step = jax.jit(functools.partial(train_step.train_step, model, opt))
  images = tiny_models.images_8bit(jax.random.key(0), 8, s.img_size)
  labels = jnp.arange(8) % s.num_classes
  state = train_step.init_state(tiny_models.init_params(s), opt)
  return step, state, images, labels


def _run(step, state, images, labels, num_steps):
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, images, labels, jax.random.key(7))
    losses.append(float(metrics["loss"]))
  return state, losses


def test_loss_decreases_on_tiny_config(tiny_step):
  step, state, images, labels = tiny_step
  state, losses = _run(step, state, images, labels, 40)
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
  assert int(state.step) == 40


def test_resumed_equals_uninterrupted(tiny_step):
  step, state, images, labels = tiny_step
  straight, straight_losses = _run(step, state, images, labels, 6)
  half, first = _run(step, state, images, labels, 3)
  resumed_state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), half)  # as if restored from disk
  resumed, second = _run(step, resumed_state, images, labels, 3)
  assert first + second == straight_losses
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)


def test_metrics(tiny_step):
  step, state, images, labels = tiny_step
  _, metrics = step(state, images, labels, jax.random.key(0))
  assert {"loss", "pixel_loss", "pixel_ce_r", "pixel_ce_g", "pixel_ce_b", "grad_norm"} <= set(metrics)
  assert float(metrics["grad_norm"]) > 0


def test_gradient_accumulation_equals_the_mean_over_micro_batches():
  """The scanned accumulation equals a Python loop over the strided micro-batches with the same keys."""
  s = tiny_models.settings("mar_2")
  model = fractal.build(s)
  params = tiny_models.init_params(s)
  images = tiny_models.images_8bit(jax.random.key(0), 6, s.img_size)
  labels = jnp.arange(6) % s.num_classes
  key = jax.random.key(3)
  items = compaction.CompactedItems()
  aux, grads = jax.jit(lambda p: train_step._accumulated(model, p, images, labels, key, 3, items))(params)
  micro_step = jax.jit(lambda p, x, y, k: train_step._loss_and_grads(model, p, x, y, k, items))  # one compilation
  parts = [micro_step(params, images[i::3], labels[i::3], jax.random.fold_in(key, i)) for i in range(3)]
  np.testing.assert_allclose(aux["loss"], np.mean([float(a["loss"]) for a, _ in parts]), rtol=1e-6)
  expected = jax.tree.map(lambda *g: sum(g) / 3, *[g for _, g in parts])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, expected)


def test_ema_follows_the_parameters():
  s = tiny_models.settings("mar_2")
  model = fractal.build(s)
  opt = optimizer.make_optimizer(optimizer.learning_rate_schedule(3e-3, warmup_steps=1, total_steps=10))
  state = train_step.init_state(tiny_models.init_params(s), opt, ema=True)
  images = tiny_models.images_8bit(jax.random.key(0), 4, s.img_size)
  step = jax.jit(functools.partial(train_step.train_step, model, opt, ema_decay=0.9))
  new, _ = step(state, images, jnp.arange(4) % s.num_classes, jax.random.key(0))
  jax.tree.map(
    lambda e, old, p: np.testing.assert_allclose(e, 0.9 * old + 0.1 * p, rtol=1e-5, atol=1e-7),
    new.ema_params,
    state.params,
    new.params,
  )


def test_ema_decay_is_given_exactly_when_the_state_has_ema():
  s = tiny_models.settings("mar_2")
  model = fractal.build(s)
  opt = optimizer.make_optimizer(optimizer.learning_rate_schedule(3e-3, warmup_steps=1, total_steps=10))
  params = tiny_models.init_params(s)
  images = tiny_models.images_8bit(jax.random.key(0), 4, s.img_size)
  labels = jnp.arange(4) % s.num_classes
  with pytest.raises(ValueError, match="has EMA parameters"):
    train_step.train_step(model, opt, train_step.init_state(params, opt, ema=True), images, labels, jax.random.key(0))
  with pytest.raises(ValueError, match="has no EMA parameters"):
    train_step.train_step(
      model, opt, train_step.init_state(params, opt), images, labels, jax.random.key(0), ema_decay=0.9
    )
