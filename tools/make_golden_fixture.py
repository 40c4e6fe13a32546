"""Golden-fixture generator and export checker for jaxsae, driven by the torch reference.

Why this exists: jaxsae reimplements dictionary_learning's ``MatryoshkaBatchTopKTrainer``
in JAX. This script runs the *reference* trainer on a tiny, seeded problem and records
its initial parameters, per-step losses / LR / threshold / dead counts and final state in
``tests/fixtures/golden_matryoshka.npz``, so the JAX tests can compare against it without
torch. The other modes check files against the reference, both ways:

  --check-export DIR            a jaxsae export (ae.safetensors + config.json, or SAELens's
                                layout) loaded into the reference SAE (or SAELens)
  --release-fixture DIR         an SAE saved as dictionary_learning's trainer saves one (ae.pt +
                                config.json, the layout of the paper's released SAEs), with the
                                reference's encodings, for tests/formats/test_release_fixture.py
  --check-load-dictionary DIR   a jaxsae export loaded by dictionary_learning's own
                                ``load_dictionary`` (reads ae.pt), as SAEBench loads SAEs

The --check-* modes compare with the expected outputs in --inputs NPZ (x, expected_encode,
expected_decode). It must run in a separate venv (never imports jax), made by
``bash tools/install_peers.sh``.

Usage::

    .venv-peers/bin/python tools/make_golden_fixture.py --out tests/fixtures/golden_matryoshka.npz
    .venv-peers/bin/python tools/make_golden_fixture.py --check-export DIR --inputs NPZ
    .venv-peers/bin/python tools/make_golden_fixture.py \
        --release-fixture tests/fixtures/dictionary_learning_release
    .venv-peers/bin/python tools/make_golden_fixture.py --check-load-dictionary DIR --inputs NPZ
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Callable

import numpy as np
import torch as t

CONFIG = dict(
    d=16,
    F=64,
    k=4,
    B=32,
    steps=12,
    warmup_steps=3,
    decay_start=8,
    threshold_start_step=4,
    threshold_beta=0.999,
    lr=1e-2,
    auxk_alpha=1 / 32,
)
GROUP_FRACTIONS = [0.125, 0.125, 0.25, 0.5]
DEAD_TOKENS_THRESHOLD = 64  # overrides the reference's 10_000_000 so AuxK engages


def import_reference() -> types.ModuleType:
  """Import dictionary_learning.trainers.matryoshka_batch_top_k, bypassing the
  package ``__init__`` (which imports nnsight)."""
  spec = importlib.util.find_spec("dictionary_learning")
  if spec is None or not spec.submodule_search_locations:
    sys.exit("dictionary_learning is not installed in this interpreter's environment")
  pkg = types.ModuleType("dictionary_learning")
  pkg.__path__ = list(spec.submodule_search_locations)
  sys.modules["dictionary_learning"] = pkg
  import dictionary_learning.trainers.matryoshka_batch_top_k as ref  # trainers/__init__ is light

  return ref


def import_load_dictionary() -> Callable:
  """dictionary_learning.utils.load_dictionary, imported through the real package: only modules
  it imports for other work and that .venv-peers lacks (nnsight for language models, datasets and
  zstandard for text corpora) are stubbed, and a stub raises if anything calls it."""

  def unavailable(*args, **kwargs):
    raise RuntimeError("stubbed by tools/make_golden_fixture.py: not installed in .venv-peers")

  stubs = {"nnsight": ["LanguageModel"], "datasets": ["load_dataset"], "zstandard": []}
  for name, attrs in stubs.items():
    if importlib.util.find_spec(name) is None:
      module = types.ModuleType(name)
      for attr in attrs:
        setattr(module, attr, unavailable)
      sys.modules[name] = module
  from dictionary_learning.utils import load_dictionary

  return load_dictionary


def make_data(
    rng: np.random.Generator, n: int, d: int, n_dirs: int = 24, n_active: int = 3
) -> np.ndarray:
  """SAE-like data: sparse nonnegative combinations of fixed unit directions, plus a
  mean offset and small noise. The directions/offset are drawn from a fixed seed so that
  the same "world" is shared by every call; ``rng`` only draws the samples."""
  world = np.random.default_rng(1234)
  dirs = world.normal(size=(n_dirs, d))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  offset = world.normal(size=d) * 1.5
  idx = np.stack([rng.choice(n_dirs, n_active, replace=False) for _ in range(n)])
  coef = rng.exponential(1.0, size=(n, n_active)) + 0.5
  x = np.einsum("na,nad->nd", coef, dirs[idx]) + offset + 0.05 * rng.normal(size=(n, d))
  return x.astype(np.float32)


def np32(x: t.Tensor) -> np.ndarray:
  return x.detach().cpu().numpy().astype(np.float32)


def make_golden(out: Path) -> None:
  """Train the reference trainer on fixed batches and save everything to ``out``."""
  ref = import_reference()
  c = CONFIG
  batches = make_data(np.random.default_rng(0), c["steps"] * c["B"], c["d"])
  batches = batches.reshape(c["steps"], c["B"], c["d"])
  trainer = ref.MatryoshkaBatchTopKTrainer(
      steps=c["steps"],
      activation_dim=c["d"],
      dict_size=c["F"],
      k=c["k"],
      layer=15,
      lm_name="tiny",
      group_fractions=GROUP_FRACTIONS,
      lr=c["lr"],
      auxk_alpha=c["auxk_alpha"],
      warmup_steps=c["warmup_steps"],
      decay_start=c["decay_start"],
      threshold_beta=c["threshold_beta"],
      threshold_start_step=c["threshold_start_step"],
      device="cpu",
      seed=0,
  )
  trainer.dead_feature_threshold = DEAD_TOKENS_THRESHOLD
  ae = trainer.ae
  init = {f"init_{n}": np32(getattr(ae, n)) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
  b_dec_median = np32(trainer.geometric_median(t.from_numpy(batches[0])))

  auxk_seen: list[float] = []
  orig_aux = trainer.get_auxiliary_loss

  def recording_aux(*args: t.Tensor) -> t.Tensor:
    out_ = orig_aux(*args)
    auxk_seen.append(float(out_.item()))
    return out_

  trainer.get_auxiliary_loss = recording_aux  # instance attribute shadows the method

  rec: dict[str, list] = {
      k: []
      for k in (
          "loss",
          "lr_per_step",
          "threshold",
          "num_dead",
          "pre_norm_auxk_loss",
          "num_tokens_since_fired",
      )
  }
  for step in range(c["steps"]):
    rec["lr_per_step"].append(trainer.optimizer.param_groups[0]["lr"])
    rec["loss"].append(trainer.update(step, t.from_numpy(batches[step])))
    rec["threshold"].append(float(ae.threshold))
    rec["num_dead"].append(trainer.dead_features)
    rec["pre_norm_auxk_loss"].append(float(t.as_tensor(trainer.pre_norm_auxk_loss).detach()))
    rec["num_tokens_since_fired"].append(trainer.num_tokens_since_fired.numpy().copy())
  assert len(auxk_seen) == c["steps"]
  loss = np.array(rec["loss"], dtype=np.float64)
  auxk = np.array(auxk_seen, dtype=np.float64)

  encode_x = make_data(np.random.default_rng(1), 8, c["d"])
  with t.no_grad():
    xt = t.from_numpy(encode_x)
    final_encode = np32(ae.encode(xt, use_threshold=True))
    final_forward = np32(ae(xt))

  arrays = dict(
      **{k: np.array(v) for k, v in c.items()},
      dead_tokens_threshold=np.array(DEAD_TOKENS_THRESHOLD),
      top_k_aux=np.array(trainer.top_k_aux),
      group_fractions=np.array(GROUP_FRACTIONS, dtype=np.float32),
      group_sizes=np.array(trainer.group_sizes, dtype=np.int64),
      group_weights=np.array(trainer.group_weights, dtype=np.float32),
      batches=batches,
      **init,
      b_dec_median=b_dec_median,
      loss=loss.astype(np.float32),
      auxk_loss=auxk.astype(np.float32),
      l2_loss=(loss - c["auxk_alpha"] * auxk).astype(np.float32),
      lr_per_step=np.array(rec["lr_per_step"], dtype=np.float32),
      threshold=np.array(rec["threshold"], dtype=np.float32),
      num_dead=np.array(rec["num_dead"], dtype=np.int64),
      pre_norm_auxk_loss=np.array(rec["pre_norm_auxk_loss"], dtype=np.float32),
      num_tokens_since_fired=np.stack(rec["num_tokens_since_fired"]).astype(np.int64),
      **{f"final_{n}": np32(getattr(ae, n)) for n in ("W_enc", "b_enc", "W_dec", "b_dec")},
      final_threshold=np.array(float(ae.threshold), dtype=np.float32),
      final_num_tokens_since_fired=trainer.num_tokens_since_fired.numpy().astype(np.int64),
      encode_x=encode_x,
      final_encode_threshold=final_encode,
      final_forward=final_forward,
  )
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez(out, **arrays)
  print_summary(arrays, out)


def print_summary(a: dict[str, np.ndarray], out: Path) -> None:
  """Print per-step values and sanity-check that the fixture exercises every code path."""
  print(
      f"group_sizes={a['group_sizes'].tolist()}  top_k_aux={int(a['top_k_aux'])}  "
      f"|b_dec_median|={np.linalg.norm(a['b_dec_median']):.3f}"
  )
  print(f"{'step':>4} {'lr':>9} {'loss':>10} {'l2':>10} {'auxk':>9} {'thresh':>9} {'dead':>4}")
  for s in range(int(a["steps"])):
    print(
        f"{s:>4} {a['lr_per_step'][s]:>9.5f} {a['loss'][s]:>10.5f} {a['l2_loss'][s]:>10.5f} "
        f"{a['auxk_loss'][s]:>9.5f} {a['threshold'][s]:>9.5f} {a['num_dead'][s]:>4}"
    )
  tss = int(a["threshold_start_step"])
  checks = {
      "lr[0] == 0": a["lr_per_step"][0] == 0,
      "lr decays after decay_start": a["lr_per_step"][-1] < a["lr_per_step"][int(a["decay_start"])],
      "threshold < 0 up to threshold_start_step": (a["threshold"][: tss + 1] < 0).all(),
      "threshold >= 0 after threshold_start_step": (a["threshold"][tss + 1 :] >= 0).all(),
      "num_dead > 0 on some step": (a["num_dead"] > 0).any(),
      "auxk_loss > 0 on some step": (a["auxk_loss"] > 0).any(),
      "encode output nonzero": (a["final_encode_threshold"] > 0).any(),
  }
  for name, ok in checks.items():
    print(f"  [{'ok' if ok else 'FAIL'}] {name}")
  print(f"wrote {out} ({len(a)} keys)")
  if not all(checks.values()):
    sys.exit("fixture does not exercise all code paths; tune the data/config")


def check_export(export_dir: Path, inputs: Path, tol: float = 1e-4) -> int:
  """Load a jaxsae export into the reference SAE (dictionary_learning layout) or into SAELens
  (SAELens layout, when DIR has cfg.json) and compare against expected outputs."""
  from safetensors.torch import load_file

  data = np.load(inputs)
  x = t.from_numpy(np.asarray(data["x"], dtype=np.float32))
  loader = (
      "SAELens SAE.load_from_disk"
      if (export_dir / "cfg.json").exists()
      else "the reference MatryoshkaBatchTopKSAE"
  )
  if (export_dir / "cfg.json").exists():  # SAELens layout: load with SAELens itself
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(export_dir), device="cpu")
    with t.no_grad():
      codes = sae.encode(x)
      got = {"encode": codes.numpy(), "decode": sae.decode(codes).numpy()}
  else:
    ref = import_reference()
    cfg = json.loads((export_dir / "config.json").read_text())["trainer"]
    ae = ref.MatryoshkaBatchTopKSAE(
        int(cfg["activation_dim"]),
        int(cfg["dict_size"]),
        int(cfg["k"]),
        [int(g) for g in cfg["group_sizes"]],
    )
    try:
      ae.load_state_dict(load_file(str(export_dir / "ae.safetensors")), strict=True)
    except RuntimeError as e:  # missing/unexpected keys or shape mismatch
      print(f"export in {export_dir} does not load into the reference SAE:\n{e}", file=sys.stderr)
      return 1
    with t.no_grad():
      got = {"encode": ae.encode(x, use_threshold=True).numpy(), "decode": ae(x).numpy()}
  return compare(got, data, tol, f"export in {export_dir}", loader)


def compare(got: dict, data, tol: float, what: str, loader: str) -> int:
  """0 if each output in `got` matches data["expected_<name>"] to atol=rtol=tol, else 1."""
  ok = True
  for name, val in got.items():
    exp = data[f"expected_{name}"]
    err = float(np.max(np.abs(val - exp))) if val.size else 0.0
    match = val.shape == exp.shape and np.allclose(val, exp, atol=tol, rtol=tol)
    print(f"{name}: max abs err {err:.3e} {'ok' if match else 'MISMATCH'}")
    ok &= match
  if not ok:
    print(f"{what} does NOT match the reference (atol=rtol={tol})", file=sys.stderr)
    return 1
  print(f"{what} loads with {loader} and matches")
  return 0


def check_load_dictionary(export_dir: Path, inputs: Path, tol: float = 1e-5) -> int:
  """Load a jaxsae export with dictionary_learning's own load_dictionary (config.json's dict_class,
  then ``MatryoshkaBatchTopKSAE.from_pretrained``: ``torch.load`` of ae.pt, weights_only by
  default, and ``load_state_dict``) and compare its encode(x) / forward(x) with jaxsae's."""
  load_dictionary = import_load_dictionary()
  data = np.load(inputs)
  x = t.from_numpy(np.asarray(data["x"], dtype=np.float32))
  try:
    ae, config = load_dictionary(str(export_dir), "cpu")
  except Exception as e:  # pylint: disable=broad-except  # report any failure to load, and fail
    print(f"load_dictionary({str(export_dir)!r}) fails: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  print(
      f"{type(ae).__name__}: k={int(ae.k)} group_sizes={ae.group_sizes.tolist()} "
      f"threshold={float(ae.threshold):.6g} layer={config['trainer'].get('layer')}"
  )
  with t.no_grad():
    got = {"encode": ae.encode(x).numpy(), "decode": ae(x).numpy()}
  return compare(got, data, tol, f"export in {export_dir}", "dictionary_learning's load_dictionary")


RELEASE = dict(d=16, F=64, k=4, B=32, group_fractions=[0.125, 0.125, 0.25, 0.5])


def make_release_fixture(out: Path) -> None:
  """A small SAE saved exactly as dictionary_learning's trainSAE saves its final SAE (the layout of
  the paper's released SAEs, microsoft/maira-2-sae): ae.pt = torch.save of the state dict's CPU
  tensors, config.json = {"trainer": trainer.config}; the trainer is the reference's own, built
  with the paper's layer and model, its SAE given random weights and a learned threshold. Beside
  them, expected.npz: inputs x and the reference SAE's outputs on them."""
  ref = import_reference()
  c = RELEASE
  trainer = ref.MatryoshkaBatchTopKTrainer(
      steps=2000,
      warmup_steps=100,
      decay_start=1600,
      threshold_start_step=200,
      activation_dim=c["d"],
      dict_size=c["F"],
      k=c["k"],
      layer=15,
      lm_name="microsoft/maira-2",
      group_fractions=c["group_fractions"],
      device="cpu",
      seed=0,
      submodule_name="language_model.model.layers.15",
  )
  ae = trainer.ae
  assert trainer.group_sizes == [8, 8, 16, 32], trainer.group_sizes
  g = t.Generator().manual_seed(0)
  with t.no_grad():
    ae.W_enc.copy_(t.randn(c["d"], c["F"], generator=g) / 2)  # not W_dec.T: a transpose shows
    W_dec = t.randn(c["F"], c["d"], generator=g)
    ae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
    ae.b_enc.copy_(t.randn(c["F"], generator=g) * 0.5)
    ae.b_dec.copy_(t.randn(c["d"], generator=g))
    x = t.randn(c["B"], c["d"], generator=g) * 2 + ae.b_dec
    ae.threshold.fill_(_threshold_between_codes(ae.encode(x, use_threshold=False)))
    encode = ae.encode(x, use_threshold=True)
    forward = ae(x)
    topk = ae.encode(x, use_threshold=False)
  pre = t.relu((x - ae.b_dec) @ ae.W_enc + ae.b_enc).detach()
  kept = t.sort(pre.flatten(), descending=True).values
  B, k = c["B"], c["k"]
  assert kept[B * k - 1] - kept[B * k] > 1e-4, "BatchTopK's cut falls between near-equal values"
  assert 0 < int((encode > 0).sum()) < int((pre > 0).sum()), "the threshold must drop some codes"
  out.mkdir(parents=True, exist_ok=True)
  for name in ("ae.pt", "config.json", "expected.npz"):
    (out / name).unlink(missing_ok=True)
  final = {k: v.cpu() for k, v in trainer.ae.state_dict().items()}  # as training.py saves it
  t.save(final, out / "ae.pt")
  with open(out / "config.json", "w") as f:
    json.dump({"trainer": trainer.config}, f, indent=4)
  np.savez(
      out / "expected.npz",
      x=np32(x),
      encode=np32(encode),
      forward=np32(forward),
      encode_topk=np32(topk),
      threshold=np.float32(ae.threshold.item()),
  )
  print(
      f"wrote {out}: group_sizes={trainer.group_sizes} threshold={ae.threshold.item():.6g} "
      f"codes kept by the threshold {int((encode > 0).sum())} of {int((pre > 0).sum())} positive"
  )


def _threshold_between_codes(codes: t.Tensor) -> float:
  """A threshold in the widest gap between BatchTopK codes near their median (what a trained
  threshold is like: it keeps about k codes per token), with no value within float error of it
  (which one implementation might keep and another drop)."""
  values = t.sort(codes[codes > 0]).values
  mid = len(values) // 2
  window = values[mid - len(values) // 8 : mid + len(values) // 8 + 1]
  gaps = window[1:] - window[:-1]
  i = int(gaps.argmax())
  assert gaps[i] > 1e-4, "no clear gap for the threshold"
  return float((window[i] + window[i + 1]) / 2)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", type=Path, help="write the golden fixture npz here")
  p.add_argument(
      "--check-export",
      type=Path,
      metavar="DIR",
      help="dir with ae.safetensors + config.json to check against the reference",
  )
  p.add_argument(
      "--check-load-dictionary",
      type=Path,
      metavar="DIR",
      help="dir with ae.pt + config.json to load with dictionary_learning's load_dictionary",
  )
  p.add_argument(
      "--release-fixture",
      type=Path,
      metavar="DIR",
      help="write an SAE as dictionary_learning's trainer saves it (ae.pt, config.json) here",
  )
  p.add_argument("--inputs", type=Path, help="npz with x, expected_encode, expected_decode")
  args = p.parse_args()
  for mode, check in (
      (args.check_export, check_export),
      (args.check_load_dictionary, check_load_dictionary),
  ):
    if mode is not None:
      if args.inputs is None:
        p.error("--check-export and --check-load-dictionary require --inputs")
      sys.exit(check(mode, args.inputs))
  if args.release_fixture is not None:
    make_release_fixture(args.release_fixture)
    return
  if args.out is None:
    p.error("give --out, --release-fixture, --check-export or --check-load-dictionary")
  t.use_deterministic_algorithms(True)
  make_golden(args.out)


if __name__ == "__main__":
  main()
