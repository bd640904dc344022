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


def test_capacity_saves_work_on_the_training_counts():
  """SMALL MAR at batch 16: on JAX-drawn masks, C + the overflow chunks that run cost < 90% of every item."""
  batch, seq_len = 16, 64
  total = batch * seq_len
  main = compaction.capacity(batch, ("mar",), (seq_len,))
  assert 0.75 * total < main < total
  assert compaction.capacity(batch, ("mar",), (seq_len,)) == main  # fixed seed: the same every time
  chunk = (total - main) // compaction.OVERFLOW_CHUNKS
  keys = jax.random.split(jax.random.key(1), 400)
  counts = np.asarray(jax.vmap(lambda k: masking.training_mask(k, batch, seq_len).sum())(keys))
  runs = [np.mean(counts > main + k * chunk) for k in range(compaction.OVERFLOW_CHUNKS)]
  assert runs == sorted(runs, reverse=True) and runs[-1] < 0.05  # the last chunks almost never run
  assert main + compaction.RECOMPUTE_COST * chunk * sum(runs) < 0.9 * total
  pixels = compaction.capacity(batch, ("mar", "mar"), (seq_len, 16))
  assert pixels < 0.8 * batch * seq_len * 16


def test_small_levels_are_not_compacted():
  assert compaction.capacity(8, ("mar",), (16,)) == 8 * 16  # fewer than MIN_ITEMS items
  assert compaction.capacity(1, ("ar",), (4096,)) == 4096  # every item has weight: nothing to save


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


def test_chunks_take_the_same_rows_of_every_group_and_round_trip():
  x = jnp.arange(24 * 2).reshape(24, 2)  # 3 groups of 8 rows, 4 chunks of 2 rows per group
  chunks = compaction.as_chunks({"x": x}, groups=3, chunks=4)["x"]
  assert chunks.shape == (4, 6, 2)
  for k in range(4):
    rows = np.concatenate([np.arange(g * 8 + 2 * k, g * 8 + 2 * k + 2) for g in range(3)])
    np.testing.assert_array_equal(chunks[k], x[rows])
  np.testing.assert_array_equal(compaction.from_chunks({"x": chunks}, groups=3)["x"], x)
  assert [compaction.overflow_chunks(n) for n in (1, 7, 9, 12, 16, 17)] == [1, 7, 3, 6, 8, 1]


def test_capacity_leaves_whole_overflow_chunks():
  batch, lens = 16, (64, 16)
  main = compaction.capacity(batch, ("mar", "mar"), lens)
  assert (batch * int(np.prod(lens)) - main) % compaction.OVERFLOW_CHUNKS == 0


def test_skippable_runs_the_chunks_that_run_with_exact_gradients():
  """Each chunk that runs equals `fn` on it with its key, in value and gradient; the others are zeros."""

  def fn(params, inputs, key):
    return {"y": jnp.tanh(inputs["x"] @ params) * inputs["keep"][:, None] + jax.random.uniform(key)}

  rng = np.random.default_rng(2)
  params = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(3, 5, 3)), jnp.float32)  # 3 chunks of 5 items
  keep = jnp.asarray(rng.random((3, 5)) > 0.3)
  keys = jax.random.split(jax.random.key(0), 3)
  weights = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)

  def loss(runs, p, x):
    return jnp.sum(weights * compaction.skippable(fn, runs, p, {"x": x, "keep": keep}, keys)["y"] ** 2)

  def reference(runs, p, x):
    ys = [fn(p, {"x": x[k], "keep": keep[k]}, keys[k])["y"] * runs[k] for k in range(3)]
    return jnp.sum(weights * jnp.stack(ys) ** 2)

  for runs in ([True, False, True], [False, False, False], [True, True, True]):
    runs = jnp.asarray(runs)
    out = compaction.skippable(fn, runs, params, {"x": x, "keep": keep}, keys)["y"]
    for k in range(3):
      want = fn(params, {"x": x[k], "keep": keep[k]}, keys[k])["y"] if runs[k] else jnp.zeros((5, 4))
      np.testing.assert_allclose(out[k], want, rtol=1e-5, atol=1e-6)
    got = jax.jit(jax.grad(loss, argnums=(1, 2)))(runs, params, x)
    want = jax.grad(reference, argnums=(1, 2))(runs, params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


@pytest.mark.parametrize(
  "family,main",
  [("mar_mar", "one"), ("mar_mar", "chunked"), ("ar_over_mar", "one"), ("mar_over_ar", "all_but_one")],
)
def test_compacted_training_loss_and_grads_equal_official(family, main, monkeypatch):
  """Training compacts the items below MAR levels (`compaction`): exact whatever the main capacity.

  The tiny models are below `compaction.MIN_ITEMS`, so the capacity is forced:
  "one" puts nearly everything in the overflow, which runs; "chunked" too, in
  `OVERFLOW_CHUNKS` chunks: the first run, the last are skipped (masks that
  hide under half the patches);
  "all_but_one" leaves an overflow of one item per group, skipped unless
  every item is hidden.
  """
  # Training semantics without dropout (AR blocks fix theirs at 0.1), so that the official-style loss compares.
  monkeypatch.setattr(blocks, "Dropout", lambda *args, **kwargs: lambda x, deterministic=None: x)
  # mar_mar with a guiding pixel at level 1: two compacted MAR levels and the guiding-pixel loss.
  extra = dict(guiding_pixel=True) if family == "mar_mar" else {}
  s = tiny_models.settings(family, label_drop_prob=0.0, attn_dropout=0.0, **extra)
  chunks = compaction.OVERFLOW_CHUNKS
  capacities = {
    "one": lambda n, kinds, lens: 1,
    "chunked": lambda n, kinds, lens: n * int(np.prod(lens)) - (n * int(np.prod(lens)) - 1) // chunks * chunks,
    "all_but_one": lambda n, kinds, lens: n * int(np.prod(lens)) - 1,
  }
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


def test_item_chunks_give_the_same_training_loss_and_grads(monkeypatch):
  """`config.model.item_chunks` (blocks over sequential chunks of their items) leaves the training loss unchanged.

  With compaction (main part and chunked overflow) and remat, as a training step runs it; dropout off so that
  the two compare exactly.
  """
  monkeypatch.setattr(blocks, "Dropout", lambda *args, **kwargs: lambda x, deterministic=None: x)
  monkeypatch.setattr(compaction, "capacity", lambda n, kinds, lens: n * int(np.prod(lens)) // 2)
  common = dict(label_drop_prob=0.0, attn_dropout=0.0, guiding_pixel=True, remat_policy="full")
  plain = tiny_models.settings("mar_mar", **common)
  levels = len(plain.levels) + 1
  chunked = tiny_models.settings("mar_mar", item_chunks=(3,) + (4,) * (levels - 1), **common)
  assert [spec.item_chunks for spec in chunked.levels] + [chunked.pixel.item_chunks] == [3] + [4] * (levels - 1)
  params = tiny_models.init_params(plain)
  images, masks, pixel_noise, guide_noise = tiny_models.loss_inputs(plain, BATCH)
  labels = jnp.zeros((BATCH,), jnp.int32)
  kwargs = dict(train=True, masks=masks, pixel_noise=pixel_noise, guide_noise=guide_noise)

  def loss(s, p):
    rngs = fractal.make_rngs(jax.random.key(0))
    return fractal.build(s).apply(
      {"params": p}, images, labels, **kwargs, arrangement=compaction.CompactedItems(), rngs=rngs
    )[0]

  want, want_grads = jax.jit(jax.value_and_grad(functools.partial(loss, plain)))(params)
  got, grads = jax.jit(jax.value_and_grad(functools.partial(loss, chunked)))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
