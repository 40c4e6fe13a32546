"""Time one training step of the peer PyTorch Matryoshka BatchTopK SAE libraries.

Why: jaxsae's ``benchmarks/bench.py`` compares our tokens/s against the
reference PyTorch implementations in a single run.  Those libraries (and torch)
live in a separate virtualenv so they cannot disturb the JAX environment, so
bench.py runs this script in a subprocess with the peer interpreter and parses
the one JSON line it prints on stdout.  Everything else (library chatter,
progress) goes to stderr.

Timed per library, on CPU in float32, with the same shapes and k:

* ``dictionary_learning``: ``MatryoshkaBatchTopKTrainer.update(step, x)``
  (forward, Matryoshka loss, backward, decoder-gradient projection, grad-norm
  clipping, Adam, LR scheduler, decoder renormalisation).  ``update(0, x)``
  (which also computes the geometric median for ``b_dec``) runs untimed during
  warmup; timed steps count up from there.
* ``saelens``: ``SAETrainer.step(x)`` on a ``MatryoshkaBatchTopKTrainingSAE``
  (``training_forward_pass`` with the nested losses, dead-feature bookkeeping,
  backward, grad-norm clipping, Adam, LR scheduler), i.e. the body of
  ``SAETrainer.fit`` without logging and checkpointing.

In the first ~1000 steps neither library counts any latent as dead, so no
auxiliary (AuxK) loss is computed by either of them.

Create the venv from scratch (from the repository root)::

    python3 -m venv .venv-peers
    .venv-peers/bin/pip install torch==2.13.0
    .venv-peers/bin/pip install --no-deps dictionary-learning einops
    .venv-peers/bin/pip install sae-lens   # keeps the installed torch 2.13.0

dictionary_learning goes in with ``--no-deps`` because its dependencies (nnsight,
torchvision) would replace the pinned torch with a newer one and gigabytes of CUDA
wheels; its package ``__init__`` imports nnsight, so the trainer module is imported
past it (``import_dictionary_learning_trainer``). ``benchmarks/bench.py`` finds
the interpreter at ``.venv-peers/bin/python`` (or ``--peers-python``).

Usage::

    .venv-peers/bin/python benchmarks/peers/bench_peers.py --d 1024 --F 8192 --k 32 \\
        --batch 2048 --groups 0.0625,0.0625,0.125,0.25,0.5 --steps 5 --warmup 2 \\
        [--libs dictionary_learning,saelens]

Output: one line ``{"dictionary_learning": {"step_s": ..., "tokens_per_s": ...,
"steps": n}, "saelens": {...}}``; a library that fails gets ``{"error": "..."}``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
import types
from typing import Callable

import torch

StepFn = Callable[[int, torch.Tensor], None]
LIBS = ("dictionary_learning", "saelens")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--d", type=int, default=1024, help="input dimension")
  p.add_argument("--F", type=int, default=8192, help="dictionary size")
  p.add_argument("--k", type=int, default=32, help="mean active latents per token")
  p.add_argument("--batch", type=int, default=2048, help="tokens per step")
  p.add_argument(
      "--groups",
      default="0.0625,0.0625,0.125,0.25,0.5",
      help="comma-separated Matryoshka group fractions, summing to 1",
  )
  p.add_argument("--steps", type=int, default=5, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  p.add_argument(
      "--libs", default=",".join(LIBS), help="comma-separated subset of " + ",".join(LIBS)
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
      "--reuse-host-memory",
      action="store_true",
      help="keep freed host memory for reuse (jaxsae/host_memory.py), as bench.py "
      "does for jaxsae, so both sides run with the same malloc settings",
  )
  return p.parse_args()


def load_host_memory() -> types.ModuleType:
  """jaxsae/host_memory.py, loaded by path: jaxsae is not installed in the peer venv, and
  this one module needs only the standard library (a ctypes call into glibc)."""
  path = os.path.join(REPO, "jaxsae", "host_memory.py")
  spec = importlib.util.spec_from_file_location("jaxsae_host_memory", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def group_sizes(F: int, fractions: list[float]) -> list[int]:
  """Sizes as dictionary_learning computes them: floor for all but the last group."""
  sizes = [int(f * F) for f in fractions[:-1]]
  return sizes + [F - sum(sizes)]


def import_dictionary_learning_trainer() -> type:
  """Import MatryoshkaBatchTopKTrainer without running the package __init__ (needs nnsight)."""
  if "dictionary_learning" not in sys.modules:
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or not spec.submodule_search_locations:
      raise ImportError("dictionary_learning is not installed")
    stub = types.ModuleType("dictionary_learning")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["dictionary_learning"] = stub
  from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

  return MatryoshkaBatchTopKTrainer


def setup_dictionary_learning(args: argparse.Namespace, fractions: list[float]) -> StepFn:
  trainer_cls = import_dictionary_learning_trainer()
  trainer = trainer_cls(
      steps=100_000,
      activation_dim=args.d,
      dict_size=args.F,
      k=args.k,
      layer=0,
      lm_name="bench",
      group_fractions=fractions,
      seed=args.seed,
      device="cpu",
  )
  return lambda step, x: trainer.update(step, x)


def setup_saelens(args: argparse.Namespace, fractions: list[float]) -> StepFn:
  from sae_lens.config import SAETrainerConfig
  from sae_lens.saes.matryoshka_batchtopk_sae import (
      MatryoshkaBatchTopKTrainingSAE,
      MatryoshkaBatchTopKTrainingSAEConfig,
  )
  from sae_lens.training.sae_trainer import SAETrainer

  sizes = group_sizes(args.F, fractions)
  widths = [sum(sizes[: i + 1]) for i in range(len(sizes))]
  cfg = MatryoshkaBatchTopKTrainingSAEConfig(
      d_in=args.d,
      d_sae=args.F,
      k=args.k,
      matryoshka_widths=widths,
      dtype="float32",
      device="cpu",
  )
  sae = MatryoshkaBatchTopKTrainingSAE(cfg)
  trainer_cfg = SAETrainerConfig(
      total_training_samples=100_000 * args.batch,
      train_batch_size_samples=args.batch,
      lr=3e-4,
      lr_end=3e-5,
      device="cpu",  # lr_end = lr / 10, as the runner config sets it
  )
  trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))

  def step(_: int, x: torch.Tensor) -> None:
    # Same per-step work as SAETrainer.fit, minus wandb logging and checkpoints.
    trainer.maybe_reset_sparsity()
    trainer.step(x)
    trainer.n_training_steps += 1

  return step


SETUPS: dict[str, Callable[[argparse.Namespace, list[float]], StepFn]] = {
    "dictionary_learning": setup_dictionary_learning,
    "saelens": setup_saelens,
}


def time_steps(
    step_fn: StepFn, batches: list[torch.Tensor], warmup: int, steps: int
) -> list[float]:
  """Run `warmup` untimed then `steps` timed calls; the step index counts up from 0."""
  times = []
  for i in range(warmup + steps):
    x = batches[i % len(batches)]
    t0 = time.perf_counter()
    step_fn(i, x)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return times


def bench_lib(
    name: str, args: argparse.Namespace, fractions: list[float], batches: list[torch.Tensor]
) -> dict[str, float | int | str]:
  try:
    torch.manual_seed(args.seed)
    step_fn = SETUPS[name](args, fractions)
    # dictionary_learning's step 0 computes the geometric median: always keep it untimed.
    warmup = max(args.warmup, 1) if name == "dictionary_learning" else args.warmup
    times = time_steps(step_fn, batches, warmup, args.steps)
  except Exception as e:  # report, don't crash: the other library may still work
    traceback.print_exc(file=sys.stderr)
    return {"error": f"{type(e).__name__}: {e}"}
  step_s = statistics.median(times)
  print(
      f"[bench_peers] {name}: steps {['%.4f' % t for t in times]} s, median {step_s:.4f} s",
      file=sys.stderr,
  )
  return {"step_s": step_s, "tokens_per_s": args.batch / step_s, "steps": len(times)}


def main() -> None:
  args = parse_args()
  if args.reuse_host_memory:
    load_host_memory().reuse_freed_memory()
  fractions = [float(f) for f in args.groups.split(",")]
  libs = [lib.strip() for lib in args.libs.split(",") if lib.strip()]
  if unknown := [lib for lib in libs if lib not in SETUPS]:
    sys.exit(f"unknown --libs {unknown}; choose from {list(SETUPS)}")
  torch.set_num_threads(os.cpu_count() or 1)
  gen = torch.Generator().manual_seed(args.seed)
  batches = [torch.randn(args.batch, args.d, generator=gen, dtype=torch.float32) for _ in range(4)]
  results = {}
  with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON line only
    for lib in libs:
      results[lib] = bench_lib(lib, args, fractions, batches)
  print(json.dumps(results), flush=True)


if __name__ == "__main__":
  main()
