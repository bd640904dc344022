"""The loss's item compaction (`fractal_jax.train.compaction`): its pieces, and the compacted loss against the official one."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from fractal_jax.model import blocks, fractal, masking
from fractal_jax.train import compaction

BATCH = 3
KEY = jax.random.key(0)


def test_count_pmf_matches_the_training_mask():
  """The host's distribution of hidden counts equals what `masking.training_mask` draws."""
  seq_len, items = 16, 40000
  hidden = np.asarray(masking.training_mask(jax.random.key(0), items, seq_len)).sum(axis=1)
  empirical = np.bincount(hidden, minlength=seq_len + 1) / items
  pmf = compaction.count_pmf(seq_len)
  assert pmf.shape == (seq_len + 1,)
  np.testing.assert_allclose(pmf.sum(), 1.0)
  np.testing.assert_allclose(empirical, pmf, atol=0.006)  # ~3 standard errors of the largest bin


def test_capacity_covers_the_training_counts():
  """SMALL MAR at batch 16: C cuts padding, and JAX-drawn masks rarely exceed it."""
  batch, seq_len = 16, 64
  main = compaction.capacity(batch, ("mar",), (seq_len,))
  assert 0.75 * batch * seq_len < main < batch * seq_len
  assert compaction.capacity(batch, ("mar",), (seq_len,)) == main  # fixed seed: the same every time
  keys = jax.random.split(jax.random.key(1), 400)
  counts = jax.vmap(lambda k: masking.training_mask(k, batch, seq_len).sum())(keys)
  assert np.mean(np.asarray(counts) > main) < 0.2
  pixels = compaction.capacity(batch, ("mar", "mar"), (seq_len, 16))
  assert pixels < 0.8 * batch * seq_len * 16


def test_small_levels_are_not_compacted():
  assert compaction.capacity(8, ("mar",), (16,)) == 8 * 16  # fewer than MIN_ITEMS items
  assert compaction.capacity(1, ("mar",), (4096,)) == 4096  # all hidden most of the time: little to save


def test_compact_orders_weighted_items_first_and_rank_inverts_it():
  weights = jnp.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
  order, rank, counts = compaction.compact(weights, groups=2)
  np.testing.assert_array_equal(order, [[1, 3, 0, 2], [0, 3, 1, 2]])
  np.testing.assert_array_equal(counts, [2, 2])
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(rank), np.asarray(order), axis=1), [[0, 1, 2, 3]] * 2)


def test_gather_gradient_is_the_inverse_permutation():
  """The custom VJP (a gather by the inverse) equals autodiff of plain indexing (a scatter-add)."""
  weights = jnp.asarray(np.random.default_rng(0).random(12) > 0.5, jnp.float32)
  order, rank, _ = compaction.compact(weights, groups=3)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(12, 5)), jnp.float32)
  w = jnp.arange(60.0).reshape(12, 5)
  ours = jax.grad(lambda x: jnp.sum(w * compaction.gather(x, order, rank) ** 2))(x)
  flat = (order + jnp.arange(3)[:, None] * 4).reshape(-1)
  plain = jax.grad(lambda x: jnp.sum(w * x[flat] ** 2))(x)
  np.testing.assert_allclose(ours, plain, rtol=1e-6)


def test_split_join_round_trip():
  x = jnp.arange(24).reshape(12, 2)
  head, rest = compaction.split({"x": x}, groups=3, main=3)
  assert head["x"].shape == (9, 2) and rest["x"].shape == (3, 2)
  np.testing.assert_array_equal(compaction.join(head, rest, groups=3)["x"], x)


def test_skippable_runs_or_skips_with_exact_gradients():
  def fn(params, inputs, key):
    return {"y": jnp.tanh(inputs["x"] @ params) * inputs["keep"][:, None]}

  params = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4)), jnp.float32)
  inputs = {"x": jnp.ones((5, 3)), "keep": jnp.array([True, False, True, True, False])}
  key = jax.random.key(0)

  def loss(run, p, x):
    return jnp.sum(compaction.skippable(fn, run, p, {**inputs, "x": x}, key)["y"] ** 2)

  for run in (True, False):
    got = jax.grad(loss, argnums=(1, 2))(jnp.asarray(run), params, inputs["x"])
    want = jax.grad(lambda p, x, r=run: jnp.sum(fn(p, {**inputs, "x": x}, key)["y"] ** 2) * r, argnums=(0, 1))(
      params, inputs["x"]
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


@pytest.mark.parametrize(
  "family,main",
  [("mar_mar", "one"), ("ar_over_mar", "one"), ("mar_over_ar", "all_but_one")],
)
def test_compacted_training_loss_and_grads_equal_official(family, main, monkeypatch):
  """Training compacts the items below MAR levels (`compaction`): exact whatever the main capacity.

  The tiny models are below `compaction.MIN_ITEMS`, so the capacity is forced:
  "one" puts nearly everything in the overflow, which runs; "all_but_one"
  leaves an overflow of one item per group, skipped unless every item is hidden.
  """
  # Training semantics without dropout (AR blocks fix theirs at 0.1), so that the official-style loss compares.
  monkeypatch.setattr(blocks, "Dropout", lambda *args, **kwargs: lambda x, deterministic=None: x)
  # mar_mar with a guiding pixel at level 1: two compacted MAR levels and the guiding-pixel loss.
  extra = dict(guiding_pixel=True) if family == "mar_mar" else {}
  s = tiny_models.settings(family, label_drop_prob=0.0, attn_dropout=0.0, **extra)
  capacities = {"one": lambda n, kinds, lens: 1, "all_but_one": lambda n, kinds, lens: n * int(np.prod(lens)) - 1}
  monkeypatch.setattr(compaction, "capacity", capacities[main])
  model = fractal.build(s)
  params = tiny_models.init_params(s)
  images, masks, pixel_noise, guide_noise = tiny_models.loss_inputs(s, BATCH)
  labels = jnp.zeros((BATCH,), jnp.int32)
  kwargs = dict(train=True, unconditional=True, masks=masks, pixel_noise=pixel_noise, guide_noise=guide_noise)

  def ours(p):
    rngs = fractal.make_rngs(jax.random.key(0))
    return model.apply({"params": p}, images, labels, **kwargs, arrangement=compaction.CompactedItems(), rngs=rngs)[0]

  def official(p):
    return tiny_models.official_style_loss(model, p, images, masks, pixel_noise, guide_noise, train=True)

  loss, grads = jax.jit(jax.value_and_grad(ours))(params)
  want_loss, want_grads = jax.jit(jax.value_and_grad(official))(params)
  np.testing.assert_allclose(loss, want_loss, rtol=2e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def test_compaction_groups_give_the_same_loss_and_grads(monkeypatch):
  """Per-shard compaction (`CompactedItems.groups`, one group per image here) equals one group."""
  monkeypatch.setattr(compaction, "capacity", lambda n, kinds, lens: 2)
  s = tiny_models.settings("mar_2", attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.0)
  params = tiny_models.init_params(s)
  images, masks, pixel_noise, _ = tiny_models.loss_inputs(s, BATCH)
  labels = jnp.arange(BATCH) % 7

  def loss(groups, p):
    return fractal.build(s).apply(
      {"params": p},
      images,
      labels,
      train=True,
      masks=masks,
      pixel_noise=pixel_noise,
      arrangement=compaction.CompactedItems(groups=groups),
      rngs=fractal.make_rngs(KEY),
    )[0]

  a, ga = jax.jit(jax.value_and_grad(functools.partial(loss, 1)))(params)
  b, gb = jax.jit(jax.value_and_grad(functools.partial(loss, BATCH)))(params)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), ga, gb)


def test_arrangements_are_for_training_only():
  """Evaluation sends every item down: the loss refuses an arrangement with train=False."""
  s = tiny_models.settings("mar_2")
  images, _, _, _ = tiny_models.loss_inputs(s, BATCH)
  labels = jnp.zeros((BATCH,), jnp.int32)
  with pytest.raises(ValueError, match="for training"):
    fractal.build(s).apply(
      {"params": tiny_models.init_params(s)}, images, labels, train=False, arrangement=compaction.CompactedItems()
    )
