"""What every kernel backend shares: the result type of the sparse loss and gradients, and the
backend platform names."""

from __future__ import annotations

from typing import NamedTuple

import jax

from jaxsae import model


class L2Result(NamedTuple):
  l2: jax.Array          # mean_i w_i * MSE_i
  sq_err: jax.Array      # [G] mean over tokens of ||x - x_hat_i||^2
  x_hat: jax.Array       # [B, d] full reconstruction (for the AuxK residual)
  grads: model.Params    # gradients of l2 w.r.t. W_enc, b_enc, W_dec, b_dec


GPU_BACKENDS = ('gpu', 'cuda', 'rocm')  # platform names the Pallas Triton kernels compile for


