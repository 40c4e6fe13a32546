"""The 'pallas_gpu' backend: Pallas (Triton lowering) kernels for the sparse Matryoshka decode and
its gradients.

The 'xla' backend (`kernels.xla.l2_and_grads`) is exact but slow on a GPU: its gradients of
W_dec and W_enc are scatter-adds of B*kc rows into dense F x d buffers. Here the same maths runs in
three kernels that never scatter:

1. `decode` — grid (token blocks of `block_tokens`, d tiles of `block_d`). Each program walks its
   tokens' candidate slots j (up to the last selected one in the block), gathers the W_dec rows
   W_dec[idx[b, j]] (masked loads: unselected slots read nothing) and adds vals * row into G
   running prefix sums, so every Matryoshka reconstruction is a cumulative sum over group index
   ranges; nothing B x F is ever built. It writes the per-prefix squared errors, the full
   reconstruction and the upstream signal R_g = sum_{i >= g} dl2/dx_hat_i, [G, B, d].
2. `backward` — the B*kc entries are sorted by latent id (one XLA argsort; unselected entries get
   a sentinel id past F and sort last), so each latent's entries form a contiguous segment (CSR).
   Two kernels, grid (latents, d tiles), walk each latent's segment `block_entries` entries at a
   time: the first gathers R_{group(f)}[b] rows and accumulates dW_dec[f] = sum vals * R rows,
   storing on the way each entry's share of dl2/dvals = <R_{group(f)}[b], W_dec[f]> (W_dec[f] is
   one row per program); the second, with those shares summed over d tiles, gathers x[b] rows and
   accumulates dW_enc[:, f] = sum dvals * (x[b] - b_dec) and db_enc[f] = sum dvals. Each program
   writes only its own rows: no atomics, no scatter, work proportional to the selected entries.

Bytes, not FLOPs, bound all three: each selected entry reads one d-row three times (W_dec in the
decode, R and x in the backward), 3 * B*k*d*4 bytes, about 13 GB at the paper's d=4096, F=16384,
k=64, B=4096. For measured times see README's Performance section.

`matryoshka_l2` wraps them as a `jax.custom_vjp` (forward = decode, backward = the CSR kernels);
`l2_and_grads` runs them back to back, and `loss_and_grads` is the training step's loss
(`kernels.sparse.loss_and_grads` around them; `sae.kernel = 'pallas'` on a GPU). The plain
references tests compare against are the 'xla' backend and autodiff of `model.loss_fn`.

Interpret mode: off only on a GPU backend; on CPU (and wherever JAXSAE_PALLAS_INTERPRET=1) the
same kernels run through Pallas's interpreter, exact but slow — that is how tests run without a
GPU. JAXSAE_PALLAS_INTERPRET=0 forces compilation. The only interpreter/compiled difference is
that compiled gathers use masked loads (the interpreter cannot mix index arrays and slices in a
masked load), with the same result.

JAX 0.11 warns that Pallas's Triton lowering is deprecated in favour of Mosaic GPU; when it goes,
`kernels.resolve('auto')` stops choosing this path (it checks the module is there).

TPU: a Mosaic version with the row gathers as DMAs driven by indices in SMEM is the 'pallas_tpu'
backend (`kernels.pallas_tpu`); `kernels.resolve('pallas')` picks it on a TPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxsae import model
from jaxsae.kernels import common, sparse


def interpret_mode() -> bool:
  """Whether to run the kernels through the interpreter: not on a GPU, unless
  JAXSAE_PALLAS_INTERPRET says otherwise (`common.interpret_override`)."""
  override = common.interpret_override()
  if override is not None:
    return override
  return jax.default_backend() not in common.GPU_BACKENDS


def _pow2_divisor(n: int, cap: int) -> int:
  """Largest power of two <= cap dividing n (Triton blocks must be powers of two)."""
  b = 1
  while b * 2 <= cap and n % (b * 2) == 0:
    b *= 2
  return b


def _gather_rows(ref, rows: jax.Array, cols: pl.Slice, mask: jax.Array, masked: bool):
  """ref[rows, cols] with rows where `mask` is False read as zeros.

  Compiled, masked-off rows are not loaded at all; the interpreter loads them (the ids are valid)
  and zeroes them, since it cannot mix an index array and a slice in a masked load.
  """
  if masked:
    mask2 = jnp.broadcast_to(mask[:, None], (rows.shape[0], cols.size))
    return plgpu.load(ref.at[rows, cols], mask=mask2, other=0.0)
  return jnp.where(mask[:, None], ref[rows, cols], 0.0)


# --------------------------------------------------------------------------------------------------
# Forward: prefix decodes, their errors, and the upstream signal for the backward
# --------------------------------------------------------------------------------------------------


def _decode_kernel(
    jmax_ref,
    vals_ref,
    idx_ref,
    x_ref,
    bdec_ref,
    w_ref,
    r_ref,
    xhat_ref,
    sq_ref,
    *,
    ends,
    coefs,
    block_d,
    masked,
):
  n = jmax_ref[pl.program_id(0)]  # candidate slots to walk for this token block
  cols = pl.ds(pl.program_id(1) * block_d, block_d)
  x = x_ref[...]  # [bt, bd]
  xc = x - bdec_ref[...][None, :]
  G = len(coefs)

  def accumulate(j, prefix):
    v, f = vals_ref[j, :], idx_ref[j, :]  # [bt]
    c = v[:, None] * _gather_rows(w_ref, f, cols, v != 0, masked)
    g = common.group_of(f, ends)
    # Prefix i holds every entry of groups <= i: the cumulative sum over index ranges.
    return tuple(p + jnp.where((g <= i)[:, None], c, 0.0) for i, p in enumerate(prefix))

  zeros = jnp.zeros(x.shape, jnp.float32)
  prefix = jax.lax.fori_loop(0, n, accumulate, (zeros,) * G)
  run = zeros
  for i in reversed(range(G)):  # R_g = sum_{i >= g} coef_i * err_i
    err = xc - prefix[i]  # x - x_hat_i
    run = run + coefs[i] * err
    r_ref[i] = run
    sq_ref[i, :] = jnp.sum(err * err, axis=1)
    if i == G - 1:
      xhat_ref[...] = x - err


class Decoded(NamedTuple):
  """What the forward kernel leaves for the loss, the metrics and the backward kernel."""

  l2: jax.Array  # mean_i w_i * MSE_i
  sq_err: jax.Array  # [G] mean over tokens of ||x - x_hat_i||^2
  x_hat: jax.Array  # [B, d] full reconstruction
  up: jax.Array  # [G, Bp, d] R_g = sum_{i >= g} dl2/dx_hat_i (tokens padded to Bp)
  vals_t: jax.Array  # [kc, Bp] vals, transposed and padded
  idx_t: jax.Array  # [kc, Bp] int32 latent ids, transposed and padded


def decode(
    params: model.Params,
    x: jax.Array,
    vals: jax.Array,
    idx: jax.Array,
    group_sizes: Sequence[int],
    group_weights: Sequence[float],
    *,
    block_tokens: int = 8,
    block_d: int = 128,
    interpret: bool | None = None,
) -> Decoded:
  """Forward kernel: every prefix reconstruction, its error and upstream signal, from sparse codes.

  vals/idx [B, kc]: selected activation values (0 where not selected) and their latent ids.
  Blocks must be powers of two (Triton); the defaults were the fastest of those tried on an H100
  at d=4096, F=16384, k=64, B=4096.
  """
  interpret = interpret_mode() if interpret is None else interpret
  B, d = x.shape
  kc = vals.shape[1]
  G = len(group_sizes)
  ends = common.group_ends(group_sizes)
  coefs = tuple(float(c) for c in common.l2_coefficients(group_weights, B))
  bt = block_tokens
  Bp = common.cdiv(B, bt) * bt
  bd = _pow2_divisor(d, block_d)
  nb, nd = Bp // bt, d // bd

  f32 = jnp.float32
  xp = jnp.pad(x.astype(f32), ((0, Bp - B), (0, 0)))
  vals_t = jnp.pad(vals.astype(f32), ((0, Bp - B), (0, 0))).T  # [kc, Bp]
  idx_t = jnp.pad(idx.astype(jnp.int32), ((0, Bp - B), (0, 0))).T
  # Slots past a block's last selected entry are skipped (top-k order puts selected slots first).
  last = jnp.max(jnp.where(vals_t != 0, jnp.arange(1, kc + 1, dtype=jnp.int32)[:, None], 0), 0)
  jmax = last.reshape(nb, bt).max(axis=1)

  kernel = functools.partial(
      _decode_kernel, ends=ends, coefs=coefs, block_d=bd, masked=not interpret
  )
  up, xhat, sq = pl.pallas_call(
      kernel,
      grid=(nb, nd),
      in_specs=[
          pl.BlockSpec(),  # jmax [nb]
          pl.BlockSpec((kc, bt), lambda i, t: (0, i)),  # vals_t
          pl.BlockSpec((kc, bt), lambda i, t: (0, i)),  # idx_t
          pl.BlockSpec((bt, bd), lambda i, t: (i, t)),  # x
          pl.BlockSpec((bd,), lambda i, t: (t,)),  # b_dec
          pl.BlockSpec(),  # W_dec, gathered by row
      ],
      out_specs=[
          pl.BlockSpec((G, bt, bd), lambda i, t: (0, i, t)),  # R [G, Bp, d]
          pl.BlockSpec((bt, bd), lambda i, t: (i, t)),  # x_hat
          pl.BlockSpec((None, G, bt), lambda i, t: (t, 0, i)),  # sq partials [nd, G, Bp]
      ],
      out_shape=[
          jax.ShapeDtypeStruct((G, Bp, d), f32),
          jax.ShapeDtypeStruct((Bp, d), f32),
          jax.ShapeDtypeStruct((nd, G, Bp), f32),
      ],
      interpret=interpret,
      compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
      name='matryoshka_sparse_decode',
  )(jmax, vals_t, idx_t, xp, params['b_dec'].astype(f32), params['W_dec'].astype(f32))

  sq_err = jnp.sum(sq, axis=0)[:, :B].sum(axis=1) / B
  l2 = jnp.mean(sq_err * jnp.asarray(group_weights, f32))
  return Decoded(l2, sq_err, xhat[:B].astype(x.dtype), up, vals_t, idx_t)


# --------------------------------------------------------------------------------------------------
# Backward: per-latent segments (CSR) of the selected entries
# --------------------------------------------------------------------------------------------------


def _segment_bounds(starts_ref, block_entries):
  """This program's latent's entries in the sorted order: (first, end, number of chunks).

  (Read at the top level of the kernel: the interpreter substitutes program ids only there.)
  """
  f = pl.program_id(0)
  lo, hi = starts_ref[f], starts_ref[f + 1]
  return lo, hi, common.cdiv(hi - lo, block_entries)


def _chunk(lo, hi, c, block_entries):
  """Chunk c of a segment: (slice of the sorted arrays, mask of the entries inside it)."""
  e0 = lo + c * block_entries
  return pl.ds(e0, block_entries), e0 + jnp.arange(block_entries, dtype=jnp.int32) < hi


def _backward_dec_kernel(
    starts_ref,
    urow_ref,
    val_ref,
    up_ref,
    wdec_ref,
    dwdec_ref,
    dvp_ref,
    *,
    block_entries,
    block_d,
    masked,
):
  t = pl.program_id(1)
  cols = pl.ds(t * block_d, block_d)
  lo, hi, n = _segment_bounds(starts_ref, block_entries)
  w = wdec_ref[...]  # W_dec[f] on this d tile  [bd]

  def chunk(c, acc):
    seg, m = _chunk(lo, hi, c, block_entries)
    urow = plgpu.load(urow_ref.at[seg], mask=m, other=0)
    v = plgpu.load(val_ref.at[seg], mask=m, other=0.0)
    up = _gather_rows(up_ref, urow, cols, m, masked)  # R_{group(f)}[b]   [be, bd]
    # dl2/dvals = <R_{group(f)}[b], W_dec[f]>, this d tile's share (summed over tiles outside).
    plgpu.store(dvp_ref.at[t, seg], jnp.sum(up * w[None, :], axis=1), mask=m)
    return acc + jnp.sum(v[:, None] * up, axis=0)

  dwdec_ref[...] = jax.lax.fori_loop(0, n, chunk, jnp.zeros((block_d,), jnp.float32))


def _backward_enc_kernel(
    starts_ref,
    tok_ref,
    dv_ref,
    x_ref,
    bdec_ref,
    dwenc_ref,
    db_ref,
    *,
    block_entries,
    block_d,
    masked,
):
  cols = pl.ds(pl.program_id(1) * block_d, block_d)
  lo, hi, n = _segment_bounds(starts_ref, block_entries)

  def chunk(c, carry):
    acc, acc_db = carry
    seg, m = _chunk(lo, hi, c, block_entries)
    tok = plgpu.load(tok_ref.at[seg], mask=m, other=0)
    dv = plgpu.load(dv_ref.at[seg], mask=m, other=0.0)
    xs = _gather_rows(x_ref, tok, cols, m, masked)  # x[b]              [be, bd]
    return acc + jnp.sum(dv[:, None] * xs, axis=0), acc_db + jnp.sum(dv)

  acc, db = jax.lax.fori_loop(
      0, n, chunk, (jnp.zeros((block_d,), jnp.float32), jnp.zeros((), jnp.float32))
  )
  dwenc_ref[...] = acc - db * bdec_ref[...]  # sum dvals * (x[b] - b_dec)
  db_ref[...] = db


def backward(
    params: model.Params,
    x: jax.Array,
    dec: Decoded,
    group_sizes: Sequence[int],
    *,
    block_entries: int = 16,
    block_d: int = 256,
    interpret: bool | None = None,
) -> model.Params:
  """Backward kernels: gradients of l2 w.r.t. W_enc, b_enc, W_dec, b_dec over selected entries.

  Two passes over the latent segments, grid (latents, d tiles) each: the first accumulates
  dW_dec[f] and each entry's share of dl2/dvals (it loads R rows anyway); the second, once those
  shares are summed over d tiles, accumulates dW_enc[:, f] and db_enc[f].
  """
  interpret = interpret_mode() if interpret is None else interpret
  B, d = x.shape
  F = params['W_dec'].shape[0]
  kc, Bp = dec.vals_t.shape
  G = len(group_sizes)
  bd = _pow2_divisor(d, block_d)
  nd = d // bd
  be = block_entries
  E = kc * Bp + be  # entries, padded: whole chunks in bounds
  f32 = jnp.float32

  # CSR by latent: entry e = j * Bp + b; unselected entries get id F and sort past every segment.
  key = jnp.where(dec.vals_t != 0, dec.idx_t, F).reshape(-1)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  s_key = key[order]
  starts = jnp.searchsorted(s_key, jnp.arange(F + 1, dtype=jnp.int32), side='left')
  starts = starts.astype(jnp.int32)
  tok = order % Bp
  group = common.group_of(s_key, common.group_ends(group_sizes))  # sentinels: the last group
  urow = group * Bp + tok  # row of R_{group(f)}[b] in [G*Bp, d]
  pad = lambda a: jnp.pad(a, (0, be))
  s_val = dec.vals_t.reshape(-1)[order]
  xp = jnp.pad(x.astype(f32), ((0, Bp - B), (0, 0)))
  b_dec = params['b_dec'].astype(f32)
  grid_opts = dict(
      grid=(F, nd),
      interpret=interpret,
      compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
  )

  dwdec, dvp = pl.pallas_call(
      functools.partial(_backward_dec_kernel, block_entries=be, block_d=bd, masked=not interpret),
      in_specs=[pl.BlockSpec()] * 4 + [pl.BlockSpec((None, bd), lambda f, t: (f, t))],
      out_specs=[pl.BlockSpec((None, bd), lambda f, t: (f, t)), pl.BlockSpec()],
      out_shape=[jax.ShapeDtypeStruct((F, d), f32), jax.ShapeDtypeStruct((nd, E), f32)],
      name='matryoshka_sparse_backward_dec',
      **grid_opts,
  )(starts, pad(urow), pad(s_val), dec.up.reshape(G * Bp, d), params['W_dec'].astype(f32))
  # Entries past the last segment were never written: zero them before summing the tiles.
  dv = jnp.where(jnp.arange(E) < starts[F], jnp.sum(dvp, axis=0), 0.0)

  dwenc_t, db = pl.pallas_call(
      functools.partial(_backward_enc_kernel, block_entries=be, block_d=bd, masked=not interpret),
      in_specs=[pl.BlockSpec()] * 4 + [pl.BlockSpec((bd,), lambda f, t: (t,))],
      out_specs=[
          pl.BlockSpec((None, bd), lambda f, t: (f, t)),
          pl.BlockSpec((None, None), lambda f, t: (t, f)),
      ],
      out_shape=[jax.ShapeDtypeStruct((F, d), f32), jax.ShapeDtypeStruct((nd, F), f32)],
      name='matryoshka_sparse_backward_enc',
      **grid_opts,
  )(starts, pad(tok), dv, xp, b_dec)

  db_enc = db[0]
  dtype = params['W_dec'].dtype
  return {
      'W_enc': dwenc_t.T.astype(dtype),
      'b_enc': db_enc.astype(dtype),
      'W_dec': dwdec.astype(dtype),
      'b_dec': common.b_dec_grad(params['W_enc'], db_enc, dec.up[0, :B].sum(axis=0)).astype(dtype),
  }


def l2_and_grads(
    params: model.Params,
    x: jax.Array,
    vals: jax.Array,
    idx: jax.Array,
    group_sizes: Sequence[int],
    group_weights: Sequence[float],
    *,
    interpret: bool | None = None,
) -> common.L2Result:
  """`kernels.xla.l2_and_grads` (same contract and result) by the Pallas kernels."""
  dec = decode(params, x, vals, idx, group_sizes, group_weights, interpret=interpret)
  grads = backward(params, x, dec, group_sizes, interpret=interpret)
  return common.L2Result(dec.l2, dec.sq_err, dec.x_hat, grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def matryoshka_l2(
    params: model.Params,
    x: jax.Array,
    vals: jax.Array,
    idx: jax.Array,
    group_sizes: tuple[int, ...],
    group_weights: tuple[float, ...],
) -> jax.Array:
  """Matryoshka reconstruction loss mean_i w_i * MSE_i from sparse codes, differentiable.

  `vals` must be the selected pre-activations of `params` at `idx` (0 elsewhere): the gradient
  w.r.t. params includes the path through them (encoder weights and biases), so `vals` itself,
  `x` and `idx` get no cotangent — the selection is treated as fixed, as BatchTopK's is.
  """
  return decode(params, x, vals, idx, group_sizes, group_weights).l2


def _matryoshka_l2_fwd(params, x, vals, idx, group_sizes, group_weights):
  dec = decode(params, x, vals, idx, group_sizes, group_weights)
  return dec.l2, (params, x, dec)


def _matryoshka_l2_bwd(group_sizes, group_weights, res, ct):
  del group_weights  # already folded into the upstream signal
  params, x, dec = res
  grads = backward(params, x, dec, group_sizes)
  return jax.tree.map(lambda g: (ct * g).astype(g.dtype), grads), None, None, None


matryoshka_l2.defvjp(_matryoshka_l2_fwd, _matryoshka_l2_bwd)


# The sparse step with these kernels, which walk the candidates in place.
loss_and_grads = sparse.in_place_backend(l2_and_grads)
