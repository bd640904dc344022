"""Samplers: cached decoding vs teacher forcing, the MAR schedule, guidance rules, determinism."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from fractal_jax.config import base_config
from fractal_jax.model import fractal, patches
from fractal_jax.parallel import mesh
from fractal_jax.sampling import chunking, draws, loaded, mar_schedule, recursion, sampler

# jax.monitoring events recorded for every traced function and every compiled program.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def official_schedule(seq_len: int, num_iter: int) -> list[tuple[set, float]]:
  """The official MAR loop on boolean masks: the set predicted at each step and its mask_len."""
  num_iter = min(seq_len, num_iter)
  order = np.arange(seq_len)  # identity order: positions equal order indices
  mask = np.ones(seq_len, bool)
  out = []
  for step in range(num_iter):
    mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
    mask_len = np.floor(seq_len * mask_ratio)
    mask_len = max(1.0, min(mask.sum() - 1.0, mask_len))
    mask_next = np.zeros(seq_len, bool)
    mask_next[order[: int(mask_len)]] = True
    to_pred = mask if step >= num_iter - 1 else mask ^ mask_next
    out.append((set(np.nonzero(to_pred)[0].tolist()), mask_len))
    mask = mask_next
  return out


def official_mask_lens(seq_len: int, num_iter: int) -> list[float]:
  """The official clamped counts, scalar arithmetic (hidden count = mask.sum())."""
  num_iter, hidden, out = min(seq_len, num_iter), float(seq_len), []
  for step in range(num_iter):
    mask_len = max(1.0, min(hidden - 1.0, np.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter))))
    out.append(mask_len)
    hidden = mask_len
  return out


def test_schedule_equals_official_for_all_lengths():
  for seq_len in range(1, 257):
    for num_iter in range(1, seq_len + 1):
      ours = mar_schedule.mar_schedule(seq_len, num_iter)
      assert list(ours.mask_len) == official_mask_lens(seq_len, num_iter), (seq_len, num_iter)
      assert ours.lo[-1] == 0 and ours.hi[0] == seq_len
      assert sum(ours.counts) == seq_len


def test_schedule_predicts_the_official_sets():
  """Boolean masks as the official loop builds them, on every (L, T) with L <= 64 and the paper's."""
  pairs = [(seq_len, num_iter) for seq_len in range(1, 65) for num_iter in range(1, seq_len + 1)]
  for seq_len, num_iter in pairs + [(256, 64), (256, 16), (16, 16), (16, 4)]:
    ours = mar_schedule.mar_schedule(seq_len, num_iter)
    for step, (predicted, mask_len) in enumerate(official_schedule(seq_len, num_iter)):
      assert set(range(ours.lo[step], ours.hi[step])) == predicted, (seq_len, num_iter, step)
      assert ours.mask_len[step] == mask_len


def test_schedule_clamps_num_iter_with_a_warning():
  with pytest.warns(UserWarning, match="exceeds the sequence length 16"):
    assert mar_schedule.clamp_num_iter(16, 64) == 16
  assert mar_schedule.mar_schedule(16, 64).num_iter == 16


def test_linear_cfg_uses_the_clamped_count():
  schedule = mar_schedule.mar_schedule(16, 4)
  last = schedule.num_iter - 1
  assert schedule.cfg_scale(3.0, last, "linear") == pytest.approx(1 + 2.0 * 15 / 16)  # never reaches cfg
  assert schedule.cfg_scale(3.0, 0, "constant") == 3.0


def test_call_sizes_cover_every_count_and_host_matches_device():
  assert chunking.split(5, (3, 6)) == [6] and chunking.split(8, (3, 6)) == [6, 3] and chunking.split(2, (3, 6)) == [3]
  assert chunking.span(6, (3, 6)) == 6 and chunking.span(7, (3, 6)) == 9  # 7 takes 6 + 3 slots
  assert chunking.span(5, (2,)) == 6
  for sizes in [(1,), (3,), (2, 5), (3, 6)]:
    for count in range(1, 14):
      calls, start = chunking.split(count, sizes), 0
      assert sum(calls) >= count and sum(calls) - calls[-1] < count  # covers, and the last call is needed
      for size in calls:  # the device rule picks the same sizes
        assert sizes[int(chunking.next_size(jnp.int32(count - start), sizes))] == size
        start += size
  assert chunking.chunk_sizes((2, 3, 5, 6), 4.0) == (3, 6)  # 18 slots in 4 calls: 34 against 40 for (6,)
  assert chunking.chunk_sizes((2, 3, 5, 6), 4.0, max_sizes=1) == (6,)
  assert chunking.chunk_sizes((2, 3, 5, 6), 16.0) == (6,)  # (3, 6) would save 6 of 88: not worth a copy
  assert chunking.chunk_sizes((2, 3, 5, 6), 0.0) == (1,)  # no call overhead: no padding
  assert chunking.chunk_sizes((1, 2, 3, 3), 4.0) == (3,)  # (1, 3) saves 2 of 28
  plan = sampler.make_plan(tiny_models.settings("mar_mar", img_size_list=(32, 4, 1)), (16, 4), cfg=1.0)
  assert plan.chunks == ((3, 6), (6,))  # L=64, T=16 over L=16, T=4 above the pixel head


def test_inverse_cdf_categorical_on_hand_made_logits():
  probs = np.asarray([0.1, 0.0, 0.25, 0.65], np.float32)
  uniform = np.linspace(0.0, 0.999, 1000, dtype=np.float32)
  logits = jnp.log(jnp.broadcast_to(jnp.asarray(probs), (1000, 4)))
  ids = np.asarray(draws.categorical(logits, jnp.asarray(uniform)))
  np.testing.assert_array_equal(ids, np.searchsorted(np.cumsum(probs), uniform, side="right"))
  assert 1 not in ids  # probability 0 is never drawn
  np.testing.assert_allclose(np.bincount(ids, minlength=4) / 1000, probs, atol=2e-3)


def test_mar_level_outputs_at_queries_equal_the_full_outputs():
  s, model, params = _bound("mar_mar", depths=(2, 2, 1))
  spec = s.levels[1]  # the level above the pixel head
  key = jax.random.key(0)
  x = jax.random.normal(key, (3, spec.seq_len, spec.patch_dim))
  conds = [jax.random.normal(jax.random.fold_in(key, i), (3, spec.cond_width)) for i in range(spec.num_conds)]
  hidden = jax.random.bernoulli(jax.random.fold_in(key, 9), 0.5, (3, spec.seq_len))
  queries = jnp.asarray([[3, 0], [1, 1], [2, 3]])
  level = lambda m, *a, **k: m.levels[1](*a, **k)  # noqa: E731
  full = model.apply({"params": params}, x, conds, hidden, method=level)
  picked = model.apply({"params": params}, x, conds, hidden, queries=queries, method=level)
  np.testing.assert_allclose(picked, jnp.take_along_axis(full, queries[..., None], axis=1), rtol=1e-5, atol=1e-6)


def test_images_do_not_depend_on_the_call_sizes():
  """Call sizes (1, 2 or 3 patches, mixed) and the last block at the step's positions only (sizes < L) or
  at all L (size 9 = L) give the same images: randomness follows patches, not calls."""
  s, model, params = _bound("mar_2")
  plan = sampler.make_plan(s, (5,), cfg=2.0)  # counts (1, 1, 2, 3, 2)
  labels = jnp.asarray([0, 4])
  images = [
    np.asarray(
      sampler.sample(model, params, labels, jax.random.key(7), dataclasses.replace(plan, chunks=(sizes,)), cfg=2.0)[0]
    )
    for sizes in [(9,), (1,), (3,), (1, 2)]
  ]
  for other in images[1:]:
    np.testing.assert_array_equal(other, images[0])


def test_guidance_filter_rule_on_hand_made_logits():
  cond = jnp.log(jnp.asarray([[0.7, 0.29999, 0.00001]]))
  uncond = jnp.asarray([[0.0, 1.0, 5.0]])
  out = np.asarray(draws.guided_logits(cond, uncond, jnp.float32(2.0), jnp.float32(1e-4)))
  # Token 2 is below the threshold: its unconditional logit is lifted to
  # max(5, c2 - max(c) + max(u)) = max(5, log(1e-5) - log(0.7) + 5) = 5 (unchanged here);
  # tokens 0 and 1 keep u.
  lifted = max(5.0, float(cond[0, 2] - cond[0].max() + uncond[0].max()))
  expected_uncond = np.asarray([0.0, 1.0, lifted])
  np.testing.assert_allclose(out[0], expected_uncond + 2.0 * (np.asarray(cond[0]) - expected_uncond), rtol=1e-6)
  # With the filter the low-probability token cannot be boosted by a large unconditional logit:
  low_uncond = jnp.asarray([[0.0, 1.0, -20.0]])
  out = np.asarray(draws.guided_logits(cond, low_uncond, jnp.float32(2.0), jnp.float32(1e-4)))
  lifted = float(cond[0, 2] - cond[0].max() + 1.0)
  np.testing.assert_allclose(out[0, 2], lifted + 2.0 * (float(cond[0, 2]) - lifted), rtol=1e-5)


def _bound(family, **overrides):
  s = tiny_models.settings(family, **overrides)
  return s, fractal.build(s), tiny_models.init_params(s)


def test_cached_ar_decoding_equals_teacher_forcing():
  s, model, params = _bound("ar_ar")
  spec = s.levels[0]
  key = jax.random.key(0)
  level_patches = jax.random.normal(key, (2, spec.seq_len, spec.patch_dim))
  cond = jax.random.normal(jax.random.fold_in(key, 1), (2, spec.cond_width))
  forced = model.apply({"params": params}, level_patches, [cond], method=lambda m, *a: m.levels[0](*a))

  def decode(params):
    cache = model.apply({"params": params}, method=lambda m: m.levels[0].init_cache(2))
    outs = []
    for t in range(spec.seq_len):
      previous = level_patches[:, max(t - 1, 0)]
      out, cache = model.apply(
        {"params": params}, cond, previous, jnp.int32(t), cache, method=lambda m, *a: m.levels[0].decode_step(*a)
      )
      outs.append(out)
    return jnp.stack(outs, axis=1)

  np.testing.assert_allclose(jax.jit(decode)(params), forced, rtol=1e-5, atol=1e-5)


def test_mar_one_token_per_step_reproduces_teacher_forced_conditionals():
  """Hiding the positions not yet generated gives, at each step, the training-time conditionals."""
  s, model, params = _bound("mar_mar")
  spec = s.levels[0]
  level_patches = jax.random.normal(jax.random.key(0), (1, spec.seq_len, spec.patch_dim))
  cond = jax.random.normal(jax.random.key(1), (1, spec.cond_width))
  order = np.random.default_rng(0).permutation(spec.seq_len)
  apply = jax.jit(
    lambda p, x, m: model.apply({"params": p}, x, [cond] * 5, m, method=lambda mod, *a: mod.levels[0](*a))
  )
  generated = np.zeros_like(np.asarray(level_patches))
  for step, position in enumerate(order):
    hidden = np.ones((1, spec.seq_len), bool)
    hidden[0, order[:step]] = False
    # sampler state: the generated patches are known, the rest hidden (their values are ignored)
    sampled_state = apply(params, jnp.asarray(generated), jnp.asarray(hidden))
    teacher = apply(params, level_patches, jnp.asarray(hidden))
    np.testing.assert_allclose(sampled_state[0, position], teacher[0, position], rtol=1e-5, atol=1e-6)
    generated[0, position] = level_patches[0, position]


SAMPLE_FAMILIES = {
  "ar_ar": (6, 4),
  "mar_mar": (4, 3),
  "mar_guiding_4": (3, 2, 2),
  "ar_over_mar": (2, 4),
  "mar_2": (5,),
}


@pytest.fixture(scope="module")
def sampling_models():
  out = {}
  for family, num_iter in SAMPLE_FAMILIES.items():
    s, model, params = _bound(family)
    out[family] = (s, model, params, num_iter)
  return out


@pytest.mark.parametrize("family", sorted(SAMPLE_FAMILIES))
def test_sample_shapes_and_determinism(sampling_models, family):
  s, model, params, num_iter = sampling_models[family]
  plan = sampler.make_plan(s, num_iter, cfg=2.0)
  labels = jnp.asarray([1, 3, 5])
  images, frames = sampler.sample(model, params, labels, jax.random.key(0), plan, cfg=2.0, temperature=1.0)
  assert images.shape == (3, s.img_size, s.img_size, 3) and images.dtype == jnp.uint8
  assert frames is None
  again, _ = sampler.sample(model, params, labels, jax.random.key(0), plan, cfg=2.0, temperature=1.0)
  np.testing.assert_array_equal(images, again)
  other, _ = sampler.sample(model, params, labels, jax.random.key(1), plan, cfg=2.0, temperature=1.0)
  assert (np.asarray(other) != np.asarray(images)).mean() > 0.5
  # Images do not depend on the batch they are in.
  alone, _ = sampler.sample(
    model, params, labels[1:2], jax.random.key(0), plan, cfg=2.0, temperature=1.0, image_ids=jnp.asarray([1])
  )
  np.testing.assert_array_equal(alone[0], images[1])


def test_guidance_scale_one_equals_unguided(sampling_models):
  s, model, params, num_iter = sampling_models["mar_mar"]
  labels = jnp.asarray([0, 2])
  plain = sampler.sample(model, params, labels, jax.random.key(4), sampler.make_plan(s, num_iter, cfg=1.0))[0]
  # The guided program (doubled batch) at scale 1: u + 1 * (c - u) = c. The filter only changes u.
  guided_plan = sampler.make_plan(s, num_iter, cfg=2.0)
  hyper_one = sampler.Hyper(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(1e-4))
  run = sampler.compile_sample(s, guided_plan, params, batch_size=2)
  doubled = run(params, labels, jnp.arange(2, dtype=jnp.int32), jax.random.key(4), hyper_one)[0]
  np.testing.assert_array_equal(plain, doubled)


def test_one_trace_for_repeated_calls(sampling_models):
  """New labels, keys and run-time scalars reuse the compiled program: no tracing, no compiling."""
  s, model, params, num_iter = sampling_models["ar_ar"]
  plan = sampler.make_plan(s, num_iter, cfg=3.0)
  sampler.sample(model, params, jnp.asarray([0, 1]), jax.random.key(0), plan, cfg=3.0)
  events = []

  def listen(event: str, duration: float, **kwargs) -> None:
    if event in (TRACE_EVENT, COMPILE_EVENT):
      events.append((event, kwargs.get("fun_name")))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    for seed in range(3):
      sampler.sample(model, params, jnp.asarray([2, 3]), jax.random.key(seed), plan, cfg=3.0, temperature=1.1)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert events == []
  # The listener hears a new program: a batch size not sampled before traces and compiles the sampler.
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    sampler.sample(model, params, jnp.asarray([2, 3, 4, 5]), jax.random.key(0), plan, cfg=3.0)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert (TRACE_EVENT, "_sample_sharded") in events  # (its compilation may come from the persistent cache)


def test_frames_record_each_level0_step(sampling_models):
  s, model, params, num_iter = sampling_models["mar_mar"]
  plan = sampler.make_plan(s, num_iter, cfg=1.0, record_frames=True)
  images, frames = sampler.sample(model, params, jnp.asarray([0]), jax.random.key(0), plan)
  assert frames.shape == (plan.schedules[0].num_iter, 1, s.img_size, s.img_size, 3)
  np.testing.assert_array_equal(frames[-1], images)


def test_bad_sampling_inputs(sampling_models):
  s, model, params, num_iter = sampling_models["mar_mar"]
  with pytest.raises(sampler.SampleError, match="num_iter has 1 entries but the model has 2"):
    sampler.make_plan(s, (4,), cfg=1.0)
  with pytest.raises(sampler.SampleError, match="cfg must be >= 1"):
    sampler.make_plan(s, num_iter, cfg=0.5)
  with pytest.raises(sampler.SampleError, match="temperature must be > 0"):
    sampler.make_plan(s, num_iter, cfg=1.0, temperature=0.0)
  plan = sampler.make_plan(s, num_iter, cfg=1.0)
  with pytest.raises(sampler.SampleError, match="labels must be class ids in 0..6"):
    sampler.sample(model, params, jnp.asarray([7]), jax.random.key(0), plan)


def test_unpatchify_of_patch_vectors_roundtrip():
  items = jax.random.normal(jax.random.key(0), (5, 2, 2, 3))
  vectors = recursion.patch_vectors(items)
  np.testing.assert_array_equal(patches.patches_as_images(vectors[None], 2), items)


@pytest.mark.parametrize("family", ["mar_guiding_4", "ar_ar"])
def test_cached_pixel_head_equals_teacher_forcing(family):
  s, model, params = _bound(family)
  cond_width = s.pixel.cond_width
  cond = jax.random.normal(jax.random.key(0), (5, cond_width))
  ids = jax.random.randint(jax.random.key(1), (5, 3), 0, 256)
  forced = model.apply({"params": params}, cond, ids, method=lambda m, *a: m.pixel_head(*a))

  def decode(params):
    cache = model.apply({"params": params}, method=lambda m: m.pixel_head.init_cache(5))
    out = []
    for channel in range(3):
      logits, cache = model.apply(
        {"params": params}, cond, ids, cache, method=lambda m, c, i, k, ch=channel: m.pixel_head.decode(c, i, ch, k)
      )
      out.append(logits)
    return jnp.stack(out, axis=1)

  np.testing.assert_allclose(jax.jit(decode)(params), forced, rtol=1e-5, atol=1e-5)


def test_label_condition_maps_minus_one_to_the_fake_latent(sampling_models):
  s, model, params, _ = sampling_models["mar_mar"]
  cond = model.apply({"params": params}, jnp.asarray([-1, 2, 0]), method=fractal.FractalModel.label_condition)
  np.testing.assert_array_equal(cond[0], params["fake_latent"][0])
  np.testing.assert_array_equal(cond[1:], params["class_emb"]["embedding"][jnp.asarray([2, 0])])


def test_loaded_sampler_batches_equal_one_sample_call(sampling_models):
  """A run of 5 images in padded batches of 2 (ids 0..4) gives the images of one checked call of all 5."""
  s, model, params, num_iter = sampling_models["mar_guiding_4"]
  sample_cfg = base_config().sample
  sample_cfg.update(num_iter=num_iter, cfg=2.0, temperature=1.1, filter_threshold=1e-3)
  ready = loaded.from_params(s, sample_cfg, params, mesh.make_mesh(), batch_size=2)
  labels, key = np.asarray([4, -1, 0, 6, 2], np.int32), jax.random.key(5)
  batches = [np.asarray(ready(labels[first : first + 2], first, key)[0]) for first in range(0, 5, 2)]
  assert ready.batch_size == 2 and batches[-1].shape[0] == 2  # the last batch is padded
  plan = sampler.make_plan(s, num_iter, cfg=2.0)
  expected, _ = sampler.sample(model, params, labels, key, plan, cfg=2.0, temperature=1.1, filter_threshold=1e-3)
  np.testing.assert_array_equal(np.concatenate(batches)[:5], expected)
