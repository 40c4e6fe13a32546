"""Time the parts of a training step (encoder matmul, candidate top-k, bisections, gradients).

    python benchmarks/profile_step.py [--d 1024 --F 8192 --k 32 --batch 2048]

Where the time of `benchmarks/bench.py`'s step goes, part by part, on whatever backend JAX runs.
The Pallas kernels (`jaxsae.kernels.pallas_gpu`) are timed on a GPU only, unless
--interpret-pallas; the native CPU kernels (`jaxsae.kernels.cpu`) on the CPU backend. Freed host
memory is kept for reuse, as in training (`jaxsae/host_memory.py`).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxsae import config as config_lib, host_memory, kernels
from jaxsae.kernels import cpu as kernels_cpu, cpu_build, pallas_gpu as kernels_pallas, sparse, xla
from jaxsae import model, selection, train_step
from timing import GROUPS, timed


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, default in (('d', 1024), ('F', 8192), ('k', 32), ('batch', 2048), ('steps', 5)):
    p.add_argument(f'--{name}', type=int, default=default)
  p.add_argument(
      '--interpret-pallas',
      action='store_true',
      help='time the Pallas kernels without a GPU too (interpret mode: slow)',
  )
  a = p.parse_args()
  host_memory.reuse_freed_memory()
  d, F, k, B = a.d, a.F, a.k, a.batch
  c = config_lib.default_config()
  c.sae.d, c.sae.dict_size, c.sae.k, c.sae.group_fractions = d, F, k, GROUPS
  sc = train_step.StepConfig.from_config(c)
  params = model.init_params(jax.random.PRNGKey(0), d, F)
  x = jax.random.normal(jax.random.PRNGKey(1), (B, d)) + 0.5
  pre = jax.jit(model.pre_activations)(params, x)
  kc = sc.candidates_per_row * k
  vals, idx, tau, _ = selection.candidates_and_threshold(pre, k, kc)
  sel_vals = jnp.where((vals >= tau) & (vals > 0), vals, 0.0)
  tsf = jnp.zeros((F,), jnp.int32)
  parts = {
      'encoder matmul + relu': (jax.jit(model.pre_activations), params, x),
      f'per-row top-{kc}': (jax.jit(lambda p: jax.lax.top_k(p, kc)[0]), pre),
      'bisection over candidates': (jax.jit(lambda v: selection.bisect_threshold(v, B * k)), vals),
      'exact threshold (total)': (jax.jit(lambda p: selection.batch_topk_threshold(p, k)), pre),
      'prefix decode (dense)': (
          jax.jit(lambda p, a: model.prefix_reconstructions(p, a, sc.group_sizes)),
          params,
          jnp.where(pre >= tau, pre, 0.0),
      ),
      'dense loss + grads': (
          jax.jit(lambda p: jax.value_and_grad(model.loss_fn, has_aux=True)(p, x, tsf, sc)[0][0]),
          params,
      ),
      'sparse l2 + grads (xla)': (
          jax.jit(
              lambda p: xla.l2_and_grads(
                  p,
                  x,
                  sel_vals,
                  idx,
                  sc.group_sizes,
                  sc.group_weights,
                  capacity=sparse.entry_capacity(B, k, kc),
              )
          ),
          params,
      ),
  }
  if jax.default_backend() in kernels.GPU_BACKENDS or a.interpret_pallas:
    dec = jax.jit(
        lambda p: kernels_pallas.decode(p, x, sel_vals, idx, sc.group_sizes, sc.group_weights)
    )
    parts.update(
        {
            'sparse l2 + grads (pallas)': (
                jax.jit(
                    lambda p: kernels_pallas.l2_and_grads(
                        p, x, sel_vals, idx, sc.group_sizes, sc.group_weights
                    )
                ),
                params,
            ),
            '  pallas decode kernel': (dec, params),
            '  pallas backward (sort + kernel)': (
                jax.jit(lambda p, r: kernels_pallas.backward(p, x, r, sc.group_sizes)),
                params,
                dec(params),
            ),
        }
    )
  if jax.default_backend() == 'cpu' and cpu_build.available():
    z, c = jax.jit(kernels_cpu.encoder_parts)(params, x)
    cap = kernels_cpu.capacity(B, k)
    entries = jax.jit(lambda z, c: kernels_cpu.select(z, c, B * k, cap))(z, c).entries
    g = {n: 1e-3 * v for n, v in params.items()}
    hyper = kernels_cpu.AdamHyper(
        lr=jnp.float32(1e-4),
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        count=jnp.int32(10),
        grad_norm=jnp.float32(0.5),
        max_norm=1.0,
        apply=jnp.bool_(True),
    )
    parts.update(
        {
            'cpu: z = x @ W_enc, c': (jax.jit(kernels_cpu.encoder_parts), params, x),
            'cpu: select': (jax.jit(lambda z, c: kernels_cpu.select(z, c, B * k, cap)), z, c),
            'cpu: l2 + grads': (
                jax.jit(
                    lambda p, e: kernels_cpu.l2_and_grads(p, x, e, sc.group_sizes, sc.group_weights)
                ),
                params,
                entries,
            ),
            'cpu: decoder gradient projection': (
                jax.jit(kernels_cpu.project_rows),
                params['W_dec'],
                g['W_dec'],
            ),
            'cpu: Adam, W_dec (+ unit rows)': (
                jax.jit(lambda p, g: kernels_cpu.adam_update(p, g, g, g, hyper, unit_rows=True)),
                params['W_dec'],
                g['W_dec'],
            ),
            'cpu: Adam, W_enc': (
                jax.jit(lambda p, g: kernels_cpu.adam_update(p, g, g, g, hyper)),
                params['W_enc'],
                g['W_enc'],
            ),
        }
    )
  print(f'{jax.devices()[0].device_kind}: d={d} F={F} k={k} B={B}')
  for name, (fn, *args) in parts.items():
    print(f'{name:32s} {timed(fn, *args, steps=a.steps) * 1e3:9.2f} ms', flush=True)


if __name__ == '__main__':
  main()
