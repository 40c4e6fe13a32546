"""Mixed precision (`sae.dtype='bfloat16'`): the encoder matmul runs on bfloat16 operands with
float32 accumulation while parameters, Adam's state, losses and gradients stay float32; a
bfloat16 store reaches the step as bfloat16; training tracks float32 closely."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from helpers import PLANTED, step_config, tiny_config, write_store
from jaxsae import data, kernels, model, trainer

GROUPS = (8, 8, 16, 32)


def _round(a):
  return a.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize('kernel', ['dense', 'xla', 'cpu'])
def test_the_bfloat16_step_is_the_float32_step_on_rounded_encoder_operands(kernel):
  """bf16 x bf16 products are exact in float32: the bfloat16 step's encoder equals the float32
  step's on x and W_enc rounded to bfloat16 (up to summation order), so the loss agrees, while
  the parameters it returns gradients for stay float32."""
  if kernel == 'cpu':
    from jaxsae.kernels import cpu_build  # pylint: disable=import-outside-toplevel

    if not cpu_build.available():
      pytest.skip('no C++ compiler here')
  F, d, B = sum(GROUPS), 24, 64
  key_p, key_x = jax.random.split(jax.random.PRNGKey(3))
  params = model.init_params(key_p, d, F)
  params['b_dec'] = 0.1 * jnp.ones((d,))
  x = jax.random.normal(key_x, (B, d)) + 0.3
  tsf = jnp.zeros((F,), jnp.int32)
  sc = step_config(GROUPS, (0.25,) * 4, kernel=kernel, auxk_alpha=0.0)
  backend = kernels.get(kernel)
  mixed = backend.loss_and_grads(
      params, x.astype(jnp.bfloat16), tsf, dataclasses.replace(sc, compute_dtype='bfloat16')
  )
  rounded = dict(params, W_enc=_round(params['W_enc']))
  ref = backend.loss_and_grads(rounded, _round(x), tsf, sc)
  plain = backend.loss_and_grads(params, x, tsf, sc)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(mixed.grads))
  np.testing.assert_allclose(mixed.loss, ref.loss, rtol=2e-5)
  np.testing.assert_allclose(mixed.stats.sq_err, ref.stats.sq_err, rtol=2e-5)
  assert abs(float(mixed.loss - plain.loss)) > 1e-7  # bfloat16 really ran
  for name in ('W_dec', 'b_enc'):
    np.testing.assert_allclose(mixed.grads[name], ref.grads[name], rtol=1e-3, atol=1e-5)


def test_a_bfloat16_store_reaches_the_step_as_bfloat16(tmp_path):
  path = tmp_path / 'store'
  write_store(path, [64] * 4, d=16, dtype='bfloat16')
  overrides = {
      'data.source': 'store',
      'data.store_path': str(path),
      'data.store_dtype': 'bfloat16',
      'sae.d': 16,
  }
  mixed = data.open_source(tiny_config(**overrides, **{'sae.dtype': 'bfloat16'}))
  plain = data.open_source(tiny_config(**overrides))
  got, want = next(data.batches(mixed)), next(data.batches(plain))
  assert got.dtype == ml_dtypes.bfloat16 and want.dtype == np.float32
  np.testing.assert_array_equal(got.astype(np.float32), want)  # the same rows, no rounding added


@pytest.mark.slow
def test_bfloat16_training_tracks_float32(tmp_path):
  """300 steps on the planted-feature experiment: losses within 2%, MMCS within 0.01."""
  base = {
      **PLANTED,
      'train.steps': 300,
      'optim.decay_start': 250,
      'train.checkpoint_every': 300,
      'train.log_every': 50,
  }
  out = {}
  for dtype in ('float32', 'bfloat16'):
    workdir = tmp_path / dtype
    summary = trainer.train_and_evaluate(tiny_config(**base, **{'sae.dtype': dtype}), str(workdir))
    rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
    out[dtype] = summary, rows
  (s32, r32), (s16, r16) = out['float32'], out['bfloat16']
  assert abs(s16['mmcs'] - s32['mmcs']) <= 0.01, (s16['mmcs'], s32['mmcs'])
  for a, b in zip(r16[1:], r32[1:]):
    assert abs(a['loss'] - b['loss']) <= 0.02 * b['loss'] + 1e-4, (a['step'], a['loss'], b['loss'])
  assert abs(s16['eval_fvu'] - s32['eval_fvu']) <= 0.01, (s16['eval_fvu'], s32['eval_fvu'])
