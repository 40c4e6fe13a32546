"""The Pallas TPU (Mosaic) kernels (`jaxsae.kernels.pallas_tpu`), in TPU interpret mode, equal the
'xla' backend and the dense reference (autodiff of `model.loss_fn`). Interpret mode simulates the
DMAs and semaphores, and fills uninitialised memory with NaN, so a row the kernels forget to fetch
or zero shows up."""

import pytest
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from helpers import random_sae, selected_candidates, step_config
from jaxsae import model
from jaxsae.kernels import pallas_tpu as kernels_pallas_tpu
from jaxsae.kernels import xla

GROUPS = (4, 4, 8, 16, 29)  # F = 61: the latent blocks of 8 have a partial last one
WEIGHTS = (0.1, 0.2, 0.2, 0.2, 0.3)


@pytest.mark.slow
def test_tpu_kernels_match_xla_and_dense():
  B, d, k, kc = 11, 24, 4, 16  # B not a multiple of the 8-token blocks
  params, x = random_sae(GROUPS, B, d)
  vals, idx, _ = selected_candidates(params, x, k, kc)
  got = kernels_pallas_tpu.l2_and_grads(
      params, x, vals, idx, GROUPS, WEIGHTS, interpret=pltpu.InterpretParams(detect_races=True)
  )
  ref = xla.l2_and_grads(params, x, vals, idx, GROUPS, WEIGHTS)
  sc = step_config(GROUPS, WEIGHTS, k=k)
  (loss, (aux, _)), dense = jax.value_and_grad(model.loss_fn, has_aux=True)(
      params, x, jnp.zeros((sum(GROUPS),), jnp.int32), sc
  )
  np.testing.assert_allclose(got.l2, ref.l2, rtol=1e-5)
  np.testing.assert_allclose(got.l2, loss, rtol=1e-5)
  np.testing.assert_allclose(got.sq_err, aux.recon_sq_err, rtol=1e-5)
  np.testing.assert_allclose(got.x_hat, ref.x_hat, rtol=1e-5, atol=1e-6)
  for name in dense:
    np.testing.assert_allclose(got.grads[name], ref.grads[name], rtol=1e-4, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(got.grads[name], dense[name], rtol=1e-4, atol=1e-7, err_msg=name)


def test_interpret_mode_switch(monkeypatch):
  monkeypatch.setenv('JAXSAE_PALLAS_INTERPRET', '0')
  assert kernels_pallas_tpu.interpret_params() is False
  monkeypatch.setenv('JAXSAE_PALLAS_INTERPRET', 'yes')
  assert isinstance(kernels_pallas_tpu.interpret_params(), pltpu.InterpretParams)
  monkeypatch.delenv('JAXSAE_PALLAS_INTERPRET')
  assert (kernels_pallas_tpu.interpret_params() is False) == (jax.default_backend() == 'tpu')
