"""The 'pallas_tpu' backend: Pallas TPU (Mosaic) kernels for the sparse Matryoshka decode and its
gradients.

The same maths and contract as the GPU kernels (`kernels.pallas_gpu`, `kernels.xla.l2_and_grads`),
shaped for a TPU: no vector gathers there, so every gathered row is a DMA from HBM into VMEM,
driven by indices read from SMEM, and the small dense products run on the MXU.

1. `decode` — grid over blocks of 8 tokens. For each token, its selected slots' W_dec rows are
   DMA'd into a [kc, d] VMEM buffer (unselected slots are zeroed), then, with G the number of
   Matryoshka groups padded to 8:
     parts  = Wg @ rows          Wg[g, j] = v_j if group(latent_j) == g    [G, d]
     errs   = xc - L @ parts     L lower-triangular ones: the prefix sums     [G, d]
     R      = U @ (coef * errs)  U upper-triangular: R_g = sum_{i>=g} coef_i err_i
     dv_j   = (R @ rows^T)[group(j), j], the loss's gradient w.r.t. each value.
   It writes R [B, G, d], x_hat, the per-prefix squared errors and dv.
2. `backward` — the entries sorted by latent (one XLA argsort; CSR), grid over blocks of 8
   latents. For each latent, chunks of 8 entries: their scalars (row of R, token, value, dv) are
   DMA'd into SMEM, their R and x - b_dec rows into VMEM, and dW_dec[f] += v R_row,
   dW_enc[:, f] += dv xc_row accumulate in registers. db_enc and b_dec's gradient are XLA
   reductions over dv and R.

Bytes bound both kernels, as on a GPU (see README's Performance section): three rows of d floats
per selected entry. Tested here in Pallas's TPU interpret mode (`pltpu.InterpretParams`) against
the 'xla' backend and the dense reference; no TPU was available to compile or time them, so
`kernels.resolve('auto')` does not pick them: ask for `sae.kernel='pallas'` on a TPU.
`loss_and_grads` is the training step's loss (`kernels.sparse.loss_and_grads` around them).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxsae import model
from jaxsae.kernels import common, sparse

_TOKENS = 8  # tokens per decode program (a TPU block's second-minor dimension)
_LATENTS = 8  # latents per backward program
_CHUNK = 8  # entries gathered per backward step
_HIGHEST = jax.lax.Precision.HIGHEST


def interpret_params():
  """False on a TPU (compile), else TPU interpret mode; JAXSAE_PALLAS_INTERPRET=1/0 overrides
  (`common.interpret_override`)."""
  override = common.interpret_override()
  interpret = jax.default_backend() != 'tpu' if override is None else override
  return pltpu.InterpretParams() if interpret else False


def _padded_groups(G: int) -> int:
  return common.cdiv(G, 8) * 8


# --------------------------------------------------------------------------------------------------
# Forward: prefix decodes, errors, upstream signal and the values' gradients
# --------------------------------------------------------------------------------------------------


def _decode_kernel(
    idx_s,
    val_s,
    val_ref,
    idx_ref,
    x_ref,
    bdec_ref,
    w_hbm,
    up_ref,
    xhat_ref,
    sq_ref,
    dv_ref,
    rows,
    sem,
    *,
    ends,
    coefs,
    kc,
):
  Gp = up_ref.shape[1]
  G = len(coefs)
  d = x_ref.shape[1]
  gids = jax.lax.broadcasted_iota(jnp.int32, (Gp, kc), 0)
  r = jax.lax.broadcasted_iota(jnp.int32, (Gp, Gp), 0)
  c = jax.lax.broadcasted_iota(jnp.int32, (Gp, Gp), 1)
  lower = (c <= r).astype(jnp.float32)  # prefix sums over groups
  upper = (c >= r).astype(jnp.float32)  # suffix sums
  coef = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (Gp, 1), 0) < G, _column(coefs, Gp), 0.0)

  for t in range(_TOKENS):

    def copy(j):
      return pltpu.make_async_copy(w_hbm.at[pl.ds(idx_s[t, j], 1)], rows.at[pl.ds(j, 1)], sem)

    def start(j, carry):
      @pl.when(val_s[t, j] != 0)
      def _():
        copy(j).start()

      @pl.when(val_s[t, j] == 0)
      def _():
        rows[pl.ds(j, 1), :] = jnp.zeros((1, d), jnp.float32)

      return carry

    def wait(j, carry):
      @pl.when(val_s[t, j] != 0)
      def _():
        copy(j).wait()

      return carry

    jax.lax.fori_loop(0, kc, start, 0)
    jax.lax.fori_loop(0, kc, wait, 0)

    v = val_ref[t : t + 1, :]  # [1, kc]
    f = idx_ref[t : t + 1, :]
    group = common.group_of(f, ends)
    onehot = group == gids  # [Gp, kc]
    weights = jnp.where(onehot, v, 0.0)
    buf = rows[...]  # [kc, d]
    parts = jnp.dot(weights, buf, precision=_HIGHEST, preferred_element_type=jnp.float32)
    xc = x_ref[t : t + 1, :] - bdec_ref[...]  # [1, d]
    errs = xc - jnp.dot(lower, parts, precision=_HIGHEST, preferred_element_type=jnp.float32)
    up = jnp.dot(upper, coef * errs, precision=_HIGHEST, preferred_element_type=jnp.float32)
    up_ref[t] = up
    xhat_ref[t : t + 1, :] = x_ref[t : t + 1, :] - errs[G - 1 : G, :]
    sq_ref[t : t + 1, :] = jax.lax.dot_general(  # [1, Gp]: sum_d err^2
        jnp.ones((1, d), jnp.float32),
        errs * errs,
        (((1,), (1,)), ((), ())),
        precision=_HIGHEST,
        preferred_element_type=jnp.float32,
    )
    m = jax.lax.dot_general(
        up, buf, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=jnp.float32
    )  # [Gp, kc]
    dv_ref[t : t + 1, :] = jnp.sum(jnp.where(onehot, m, 0.0), axis=0, keepdims=True) * (v != 0)


def _column(values: Sequence[float], n: int) -> jax.Array:
  """A constant [n, 1] column holding `values` then zeros, built from iota (kernels take no
  captured arrays)."""
  i = jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0)
  out = jnp.zeros((n, 1), jnp.float32)
  for g, value in enumerate(values):
    out = jnp.where(i == g, jnp.float32(value), out)
  return out


class Decoded(NamedTuple):
  l2: jax.Array  # mean_i w_i * MSE_i
  sq_err: jax.Array  # [G] mean over tokens of ||x - x_hat_i||^2
  x_hat: jax.Array  # [B, d]
  up: jax.Array  # [Bp, Gp, d] R_g = sum_{i >= g} dl2/dx_hat_i (tokens and groups padded)
  dv: jax.Array  # [Bp, kc] dl2/dvals (0 where not selected)


def decode(
    params: model.Params,
    x: jax.Array,
    vals: jax.Array,
    idx: jax.Array,
    group_sizes: Sequence[int],
    group_weights: Sequence[float],
    *,
    interpret=None,
) -> Decoded:
  """Forward kernel. vals/idx [B, kc]: selected values (0 where not selected) and latent ids."""
  interpret = interpret_params() if interpret is None else interpret
  B, d = x.shape
  kc = vals.shape[1]
  G = len(group_sizes)
  Gp = _padded_groups(G)
  ends = common.group_ends(group_sizes)
  coefs = tuple(float(c) for c in common.l2_coefficients(group_weights, B))
  Bp = common.cdiv(B, _TOKENS) * _TOKENS
  f32 = jnp.float32
  pad = lambda a: jnp.pad(a, ((0, Bp - B), (0, 0)))  # noqa: E731
  vals_p, idx_p = pad(vals.astype(f32)), pad(idx.astype(jnp.int32))
  xp = pad(x.astype(f32))
  blk = lambda i: (i, 0)  # noqa: E731

  up, xhat, sq, dv = pl.pallas_call(
      functools.partial(_decode_kernel, ends=ends, coefs=coefs, kc=kc),
      grid=(Bp // _TOKENS,),
      in_specs=[
          pl.BlockSpec((_TOKENS, kc), blk, memory_space=pltpu.SMEM),  # latent ids (scalars)
          pl.BlockSpec((_TOKENS, kc), blk, memory_space=pltpu.SMEM),  # values (scalars)
          pl.BlockSpec((_TOKENS, kc), blk),  # values (vector)
          pl.BlockSpec((_TOKENS, kc), blk),  # latent ids (vector)
          pl.BlockSpec((_TOKENS, d), blk),  # x
          pl.BlockSpec((1, d), lambda i: (0, 0)),  # b_dec
          pl.BlockSpec(memory_space=pl.ANY),  # W_dec, DMA'd by row
      ],
      out_specs=[
          pl.BlockSpec((_TOKENS, Gp, d), lambda i: (i, 0, 0)),  # R
          pl.BlockSpec((_TOKENS, d), blk),  # x_hat
          pl.BlockSpec((_TOKENS, Gp), blk),  # squared errors
          pl.BlockSpec((_TOKENS, kc), blk),  # dv
      ],
      out_shape=[
          jax.ShapeDtypeStruct((Bp, Gp, d), f32),
          jax.ShapeDtypeStruct((Bp, d), f32),
          jax.ShapeDtypeStruct((Bp, Gp), f32),
          jax.ShapeDtypeStruct((Bp, kc), f32),
      ],
      scratch_shapes=[pltpu.VMEM((kc, d), f32), pltpu.SemaphoreType.DMA(())],
      interpret=interpret,
      name='matryoshka_sparse_decode_tpu',
  )(
      idx_p,
      vals_p,
      vals_p,
      idx_p,
      xp,
      params['b_dec'].astype(f32).reshape(1, d),
      params['W_dec'].astype(f32),
  )
  sq_err = jnp.sum(sq[:B, :G], axis=0) / B
  l2 = jnp.mean(sq_err * jnp.asarray(group_weights, f32))
  return Decoded(l2, sq_err, xhat[:B].astype(x.dtype), up, dv)


# --------------------------------------------------------------------------------------------------
# Backward: per-latent segments (CSR) of the selected entries
# --------------------------------------------------------------------------------------------------


def _backward_kernel(
    bounds_s,
    urow_hbm,
    tok_hbm,
    val_hbm,
    dv_hbm,
    up_hbm,
    xc_hbm,
    dwdec_ref,
    dwenc_ref,
    urow_s,
    tok_s,
    val_s,
    dv_s,
    rbuf,
    xbuf,
    sems,
):
  d = dwdec_ref.shape[1]

  def gather(p0):
    scalars = [
        pltpu.make_async_copy(src.at[pl.ds(p0, _CHUNK)], dst, sems.at[k])
        for k, (src, dst) in enumerate(
            ((urow_hbm, urow_s), (tok_hbm, tok_s), (val_hbm, val_s), (dv_hbm, dv_s))
        )
    ]
    for cp in scalars:
      cp.start()
    for cp in scalars:
      cp.wait()

  for j in range(_LATENTS):
    lo, hi = bounds_s[0, j], bounds_s[0, j + 1]

    def chunk(c, acc):
      acc_dec, acc_enc = acc
      p0 = lo + c * _CHUNK
      gather(p0)
      rows = []
      for i in range(_CHUNK):
        rows.append(
            (
                pltpu.make_async_copy(
                    up_hbm.at[pl.ds(urow_s[i], 1)], rbuf.at[pl.ds(i, 1)], sems.at[4]
                ),
                pltpu.make_async_copy(
                    xc_hbm.at[pl.ds(tok_s[i], 1)], xbuf.at[pl.ds(i, 1)], sems.at[5]
                ),
            )
        )
      for i, (cr, cx) in enumerate(rows):

        @pl.when(p0 + i < hi)
        def _():
          cr.start()
          cx.start()

      for i, (cr, cx) in enumerate(rows):

        @pl.when(p0 + i < hi)
        def _():
          cr.wait()
          cx.wait()

      for i in range(_CHUNK):
        live = p0 + i < hi
        v = jnp.where(live, val_s[i], 0.0)
        dv = jnp.where(live, dv_s[i], 0.0)
        r_row = jnp.where(live, rbuf[pl.ds(i, 1), :], 0.0)
        x_row = jnp.where(live, xbuf[pl.ds(i, 1), :], 0.0)
        acc_dec = acc_dec + v * r_row
        acc_enc = acc_enc + dv * x_row
      return acc_dec, acc_enc

    zeros = jnp.zeros((1, d), jnp.float32)
    acc_dec, acc_enc = jax.lax.fori_loop(0, common.cdiv(hi - lo, _CHUNK), chunk, (zeros, zeros))
    dwdec_ref[j : j + 1, :] = acc_dec
    dwenc_ref[j : j + 1, :] = acc_enc


def backward(
    params: model.Params,
    x: jax.Array,
    vals: jax.Array,
    idx: jax.Array,
    dec: Decoded,
    group_sizes: Sequence[int],
    *,
    interpret=None,
) -> model.Params:
  """Backward kernel: gradients of l2 w.r.t. W_enc, b_enc, W_dec, b_dec over selected entries."""
  interpret = interpret_params() if interpret is None else interpret
  B, d = x.shape
  F = params['W_dec'].shape[0]
  Bp, Gp, _ = dec.up.shape
  kc = vals.shape[1]
  Fp = common.cdiv(F, _LATENTS) * _LATENTS
  f32 = jnp.float32

  vals_p = jnp.pad(vals.astype(f32), ((0, Bp - B), (0, 0))).reshape(-1)
  idx_p = jnp.pad(idx.astype(jnp.int32), ((0, Bp - B), (0, 0))).reshape(-1)
  key = jnp.where(vals_p != 0, idx_p, Fp)  # unselected entries sort past every latent
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  s_lat = key[order]
  starts = jnp.searchsorted(s_lat, jnp.arange(Fp + 1, dtype=jnp.int32), side='left')
  starts = starts.astype(jnp.int32)
  bounds = jnp.stack([starts[i : i + Fp : _LATENTS] for i in range(_LATENTS + 1)], axis=1)
  bounds = jnp.pad(bounds, ((0, 0), (0, 16 - (_LATENTS + 1))))  # [Fp / 8, 16]
  tok = order // kc
  group = common.group_of(s_lat, common.group_ends(group_sizes))  # sentinels: the last group
  urow = tok * Gp + group  # row of R_{group(f)}[b] in [Bp * Gp, d]
  s_val, s_dv = vals_p[order], dec.dv.reshape(-1)[order]
  tail = lambda a: jnp.pad(a, (0, _CHUNK))  # noqa: E731 (whole chunks stay in bounds)
  xc = jnp.pad(x.astype(f32) - params['b_dec'].astype(f32), ((0, Bp - B), (0, 0)))
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  rows = lambda i: (i, 0)  # noqa: E731

  dwdec, dwenc_t = pl.pallas_call(
      _backward_kernel,
      grid=(Fp // _LATENTS,),
      in_specs=[pl.BlockSpec((1, 16), rows, memory_space=pltpu.SMEM)] + [hbm] * 6,
      out_specs=[pl.BlockSpec((_LATENTS, d), rows), pl.BlockSpec((_LATENTS, d), rows)],
      out_shape=[jax.ShapeDtypeStruct((Fp, d), f32), jax.ShapeDtypeStruct((Fp, d), f32)],
      scratch_shapes=[
          pltpu.SMEM((_CHUNK,), jnp.int32),
          pltpu.SMEM((_CHUNK,), jnp.int32),
          pltpu.SMEM((_CHUNK,), f32),
          pltpu.SMEM((_CHUNK,), f32),
          pltpu.VMEM((_CHUNK, d), f32),
          pltpu.VMEM((_CHUNK, d), f32),
          pltpu.SemaphoreType.DMA((6,)),
      ],
      interpret=interpret,
      name='matryoshka_sparse_backward_tpu',
  )(bounds, tail(urow), tail(tok), tail(s_val), tail(s_dv), dec.up.reshape(Bp * Gp, d), xc)

  live = s_lat < F
  db_enc = (
      jnp.zeros((Fp + 1,), f32).at[jnp.where(live, s_lat, Fp)].add(jnp.where(live, s_dv, 0.0))[:F]
  )
  dtype = params['W_dec'].dtype
  return {
      'W_enc': dwenc_t[:F].T.astype(dtype),
      'b_enc': db_enc.astype(dtype),
      'W_dec': dwdec[:F].astype(dtype),
      'b_dec': common.b_dec_grad(params['W_enc'], db_enc, dec.up[:B, 0].sum(axis=0)).astype(dtype),
  }


def l2_and_grads(
    params: model.Params,
    x: jax.Array,
    vals: jax.Array,
    idx: jax.Array,
    group_sizes: Sequence[int],
    group_weights: Sequence[float],
    *,
    interpret=None,
) -> common.L2Result:
  """`kernels.xla.l2_and_grads` (same contract and result) by the two TPU kernels."""
  dec = decode(params, x, vals, idx, group_sizes, group_weights, interpret=interpret)
  grads = backward(params, x, vals, idx, dec, group_sizes, interpret=interpret)
  return common.L2Result(dec.l2, dec.sq_err, dec.x_hat, grads)


# The sparse step with these kernels, which walk the candidates in place.
loss_and_grads = sparse.in_place_backend(l2_and_grads)
