"""The activation export at realistic input sizes: does the pipeline hide study preparation?

    python benchmarks/bench_export.py [--studies 48] [--workers 0,1,2] [--repeats 1]
        [--processes 1,2 --proc-workers 1] [--model maira2|llava] [--hidden 32 --heads 1]
        [--batch-size 4] [--bucket-window 8] [--forward-threads 1]
        [--dir /tmp/jaxsae_bench_export] [--json figures.json]

Inputs, generated once and cached under --dir (deterministic, seeded): N studies of 1-3
greyscale X-ray-like JPEGs of about 2500 x 3000 px at quality 90 (frontal, + lateral, + prior
frontal; ~1.7 MB each, about MIMIC-CXR-JPG's size), their manifest.jsonl with the demo's report
texts, and a tiny random MAIRA-2 in the real checkpoint's layout (518-px images -> 1369 tokens
each, hooked at decoder layer 15). The question is whether worker processes take study preparation
(JPEG decode, normalisation, the processor, token kinds) off the forward loop's path, so the
forward pass should cost about what preparing a study costs on one core: both are measured and
printed, and --hidden / --heads / --batch-size set the forward's cost. Each exporting process
runs its forward pass on --forward-threads torch threads (1: the other cores are the workers', as
beside a GPU). On a CPU, padded batches cost far more than single studies (the attention mask),
which is why the default model has one attention head.

1. One process, in-process `jaxsae.bridge.export.export` with export.workers = each of --workers,
   a fresh store each run: studies/s, the share of the loop spent waiting for prepared studies,
   forward seconds per study (median of --repeats runs).
2. export.processes = each of --processes, one subprocess per process index writing into one
   store, each with --proc-workers workers: total studies / the slowest process's export-loop
   seconds, the wall clock of the whole run (model loads included), and the studies the store
   reads back.
Ends with what the measured preparation cost predicts for one GPU at MAIRA-2's size.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_VERSION = 1  # bump when the generated studies change, so cached folders are rebuilt
HOOK_LAYER = {'maira2': 15, 'llava': 2}  # experiments/demo.py's layers
DEFAULT_LAYERS = {'maira2': 17, 'llava': 4}
GPU_RATE = (15, 20)  # two-image studies/s one GPU forwards through layer 15 in bfloat16


def _tools_script(name: str):
  """A script of the repository's tools/, imported by path (bench_io imports jax; this does not)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'tools', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ---------------------------------------------------------------------------------------- inputs


def xray(rng: np.random.Generator, width: int, height: int, lateral: bool) -> Image.Image:
  """An 8-bit radiograph-like image: smooth body, lungs, ribs, heart and spine drawn at 1/8 size
  and upsampled, plus mid-frequency texture and per-pixel noise, so that JPEG has about the
  entropy of a real chest X-ray (~1.7 MB at quality 90)."""
  lh, lw = height // 8, width // 8
  yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
  yy /= lh
  xx /= lw
  shift_y, shift_x = rng.uniform(-0.03, 0.03, 2)
  ell = lambda cy, cx, ry, rx: ((yy - cy - shift_y) / ry) ** 2 + ((xx - cx - shift_x) / rx) ** 2
  body = np.sqrt(np.clip(1.2 - ell(0.55, 0.5, 0.55, 0.45), 0, 1))
  img = 0.08 + 0.55 * body
  for cx in (0.5,) if lateral else (0.32, 0.68):
    lung = np.clip(1 - ell(0.45, cx, 0.3, 0.3 if lateral else rng.uniform(0.14, 0.18)), 0, 1)
    lung **= 0.4
    phase = 2 * np.pi * (yy * 11 + 6 * (xx - cx) ** 2) + rng.uniform(0, 2 * np.pi)
    img += lung * (0.08 * (0.5 + 0.5 * np.sin(phase)) ** 3 - 0.35)  # dark lungs, bright ribs
  heart = np.clip(1 - ell(0.62, 0.4 if lateral else 0.55, 0.15, rng.uniform(0.14, 0.22)), 0, 1)
  img += 0.3 * heart**0.3
  if not lateral:
    img += 0.2 * np.exp(-(((xx - 0.5 - shift_x) / 0.04) ** 2)) * body  # spine
  img += 0.04 * rng.standard_normal((lh, lw), dtype=np.float32)
  full = np.asarray(Image.fromarray(img.astype(np.float32), 'F').resize((width, height), 2))
  texture = rng.standard_normal((height // 3, width // 3), dtype=np.float32)
  full = full + 0.05 * np.asarray(Image.fromarray(texture, 'F').resize((width, height), 2))
  full = full * 230 + 3 * rng.standard_normal((height, width), dtype=np.float32)
  return Image.fromarray(np.clip(full, 0, 255).astype(np.uint8), 'L')


def make_data(out: str, n: int, seed: int = 0) -> tuple[str, list[dict]]:
  """`n` studies (images + manifest.jsonl) in `out`, reused when `out` already holds the same
  settings; returns the manifest's path and its rows."""
  manifest = os.path.join(out, 'manifest.jsonl')
  stamp_path = os.path.join(out, 'settings.json')
  stamp = {'version': DATA_VERSION, 'studies': n, 'seed': seed}
  if os.path.exists(stamp_path) and os.path.exists(manifest):
    with open(stamp_path) as f:
      if json.load(f) == stamp:
        with open(manifest) as m:
          return manifest, [json.loads(line) for line in m]
  demo = _tools_script('make_demo_data')
  os.makedirs(os.path.join(out, 'images'), exist_ok=True)
  rng = np.random.default_rng(seed)
  rows = []
  t = time.perf_counter()
  for i in range(n):
    sid = f'bench-{i:04d}'
    has_lateral, has_prior = bool(rng.random() < 0.5), bool(rng.random() < 0.4)
    # pylint: disable-next=protected-access  (the demo's findings generator, reused)
    prior = demo._condition(rng) if has_prior else None
    cond = demo._evolve(prior, rng) if has_prior else demo._condition(rng)  # pylint: disable=W0212
    row = {
        'study_id': sid,
        'frontal': f'images/{sid}_frontal.jpg',
        'lateral': f'images/{sid}_lateral.jpg' if has_lateral else None,
        'prior_frontal': f'images/{sid}_prior.jpg' if has_prior else None,
        'indication': str(rng.choice(demo.INDICATIONS)),
        'technique': (
            'PA and lateral views of the chest.'
            if has_lateral
            else 'Portable AP view of the chest.'
        ),
        'comparison': (
            f'Radiograph from {int(rng.integers(1, 30))} days earlier.' if has_prior else None
        ),
        'prior_report': demo.findings(prior) if has_prior else None,
        'findings': demo.findings(cond, prior),
    }
    for field in ('frontal', 'lateral', 'prior_frontal'):
      if row[field]:
        w, h = int(rng.integers(2400, 2601)), int(rng.integers(2900, 3101))
        xray(rng, w, h, field == 'lateral').save(os.path.join(out, row[field]), quality=90)
    rows.append(row)
  with open(manifest, 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  with open(stamp_path, 'w') as f:
    json.dump(stamp, f)
  print(f'generated {n} studies in {time.perf_counter() - t:.1f} s ({out})', flush=True)
  return manifest, rows


def build_model(out: str, kind: str, hidden: int, layers: int, heads: int, rows: list[dict]) -> str:
  """The tiny model in `out` (reused when built with the same settings); returns its path.

  MAIRA-2's builder writes 4 decoder attention heads; `heads` rewrites that in config.json (the
  weights' shapes do not depend on it), since on a CPU the padded batches' attention costs in
  proportion to the heads, whatever the width."""
  stamp_path = os.path.join(out, 'bench_settings.json')
  stamp = {'kind': kind, 'hidden': hidden, 'layers': layers, 'heads': heads, 'data': DATA_VERSION}
  if os.path.exists(stamp_path):
    with open(stamp_path) as f:
      if json.load(f) == stamp:
        return out
  shutil.rmtree(out, ignore_errors=True)
  texts = _tools_script('make_demo_data').vocabulary_texts(rows)
  if kind == 'maira2':
    from jaxsae.bridge.maira2 import checkpoint  # pylint: disable=import-outside-toplevel

    checkpoint.build(out, texts, hidden=hidden, layers=layers)
    with open(os.path.join(out, 'config.json')) as f:
      raw = json.load(f)
    raw['text_config']['num_attention_heads'] = raw['text_config']['num_key_value_heads'] = heads
    with open(os.path.join(out, 'config.json'), 'w') as f:
      json.dump(raw, f, indent=2)
  else:
    from jaxsae.bridge import tiny_model  # pylint: disable=import-outside-toplevel

    tiny_model.build(out, tiny_model.words(texts), hidden=hidden, layers=layers, heads=heads)
  with open(stamp_path, 'w') as f:
    json.dump(stamp, f)
  return out


def make_config(kind: str, model_dir: str, manifest: str, store: str, hidden: int, **export):
  """experiments/demo.py's config for `kind` on the benchmark's model and studies; `export`
  sets export.* keys (workers, processes, ...)."""
  from jaxsae import config as config_lib  # pylint: disable=import-outside-toplevel

  c = config_lib.load_experiment(os.path.join(REPO, 'experiments', 'demo.py'), kind)
  c.model.name, c.export.manifest, c.data.store_path = model_dir, manifest, store
  c.sae.d = hidden
  for key, value in export.items():
    if value is not None:
      setattr(c.export, key, value)
  return c


# ----------------------------------------------------------------------------------- measuring


def measure_parts(c, batch_size: int) -> dict:
  """Seconds per study of preparing it in this process (image reads included) and of the forward
  pass alone on prepared batches; per study, its image count and tokens."""
  # pylint: disable=import-outside-toplevel
  import torch
  from jaxsae.bridge import export, loading, manifest, prompt

  model, processor = loading.load(c)
  _, module = loading.find_layer(model, c.model.hook_name, c.model.layer)
  image_id = export._image_token_id(model, processor)  # pylint: disable=protected-access
  studies = manifest.read(c.export.manifest, c.export.teacher_forcing)
  prep_s, prepared = [], []
  for s in studies:
    t = time.perf_counter()
    prepared.append(
        prompt.prepare(processor, s, dict(s.images()), c.export.teacher_forcing, image_id)
    )
    prep_s.append(time.perf_counter() - t)
  capture = export.Capture(module, stop=c.export.stop_at_layer)
  dtype = getattr(torch, c.model.dtype)
  by_length = sorted(prepared, key=lambda p: len(p.input_ids))  # as the export buckets them
  batches = [
      export.collate(by_length[i : i + batch_size], 0, torch.device(c.model.device), dtype)
      for i in range(0, len(by_length), batch_size)
  ]
  capture.run(model, batches[0])  # warm-up
  t = time.perf_counter()
  for b in batches:
    capture.run(model, b)
  forward = time.perf_counter() - t
  capture.remove()
  return {
      'prep_s': prep_s,
      'images': [
          sum(im is not None for im in (s.frontal, s.lateral, s.prior_frontal)) for s in studies
      ],
      'tokens': [len(p.input_ids) for p in prepared],
      'forward_s_per_study': forward / len(prepared),
      'torch_threads': torch.get_num_threads(),
  }


def run_record(meta: dict, wall: float) -> dict:
  """The export's 'run' record; for an export that has none (the serial one before the pipeline),
  what can be told from outside: studies and wall seconds, model load included."""
  if 'run' in meta:
    return dict(meta['run'])
  studies = int(meta.get('studies', 0))
  return {
      'studies': studies,
      'seconds': wall,
      'input_wait_s': None,
      'forward_s': None,
      'input_wait_share': None,
      'studies_per_s': studies / wall,
      'dropped': {},
      'note': "no 'run' record (serial export): seconds include the model load",
  }


def export_once(c) -> dict:
  from jaxsae.bridge import export  # pylint: disable=import-outside-toplevel

  t = time.perf_counter()
  meta = export.export(c, progress=False)
  return run_record(meta, time.perf_counter() - t)


def _median(runs: list[dict], key: str):
  values = [r[key] for r in runs if r.get(key) is not None]
  return statistics.median(values) if values else None


def sweep_workers(args, paths: dict, root: str) -> list[dict]:
  rows = []
  for workers in args.workers:
    runs = []
    for r in range(args.repeats):
      store = os.path.join(root, f'store_w{workers}_r{r}')
      shutil.rmtree(store, ignore_errors=True)
      c = make_config(
          args.model,
          paths['model'],
          paths['manifest'],
          store,
          args.hidden,
          batch_size=args.batch_size,
          workers=workers,
          bucket_window=args.bucket_window,
      )
      runs.append(export_once(c))
      shutil.rmtree(store, ignore_errors=True)
      print(f'  workers={workers} repeat {r}: {json.dumps(runs[-1])}', flush=True)
    keys = ('studies', 'seconds', 'input_wait_s', 'forward_s', 'input_wait_share', 'studies_per_s')
    rows.append(
        {'setting': f'workers={workers}', 'workers': workers, 'runs': runs}
        | {k: _median(runs, k) for k in keys}
    )
  return rows


def _drive(spec_json: str) -> None:
  """One exporting process (run by compare_processes as `python -c`): loads the model, exports
  its share, prints a JSON line last: the 'run' record, the commit's study count, load and wall
  seconds."""
  spec = json.loads(spec_json)
  t0 = time.perf_counter()
  import torch  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(spec['threads'])
  c = make_config(**spec['config'])
  from jaxsae.bridge import export  # pylint: disable=import-outside-toplevel

  t = time.perf_counter()
  meta = export.export(c, progress=False)
  run = run_record(meta, time.perf_counter() - t)
  out = {
      'run': run,
      'commit_studies': meta.get('studies'),
      'wall_s': time.perf_counter() - t0,
  }
  print(json.dumps(out), flush=True)


def compare_processes(args, paths: dict, root: str) -> list[dict]:
  rows = []
  for n in args.processes:
    store = os.path.join(root, f'store_p{n}')
    shutil.rmtree(store, ignore_errors=True)
    threads = args.forward_threads
    procs = []
    t = time.perf_counter()
    for i in range(n):
      spec = {
          'threads': threads,
          'config': {
              'kind': args.model,
              'model_dir': paths['model'],
              'manifest': paths['manifest'],
              'store': store,
              'hidden': args.hidden,
              'batch_size': args.batch_size,
              'workers': args.proc_workers,
              'bucket_window': args.bucket_window,
              **({'processes': n, 'process_index': i} if n > 1 else {}),
          },
      }
      code = (
          f'import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); '
          f'import bench_export; bench_export._drive(sys.argv[1])'
      )
      log = os.path.join(root, f'process_{i}_of_{n}')  # files, not pipes: none can fill up
      with open(log + '.out', 'w') as out, open(log + '.err', 'w') as err:
        procs.append(
            subprocess.Popen(
                [sys.executable, '-c', code, json.dumps(spec)], cwd=REPO, stdout=out, stderr=err
            )
        )
    for proc in procs:
      proc.wait()
    wall = time.perf_counter() - t
    results = []
    for i, proc in enumerate(procs):
      log = os.path.join(root, f'process_{i}_of_{n}')
      with open(log + '.out') as out, open(log + '.err') as err:
        lines, errors = out.read().strip().splitlines(), err.read()
      if proc.returncode or not lines:
        raise RuntimeError(f'process {i}/{n} failed (exit {proc.returncode}):\n{errors[-3000:]}')
      results.append(json.loads(lines[-1]))
    total = sum(r['run']['studies'] for r in results)
    slowest = max(r['run']['seconds'] for r in results)
    row = {
        'setting': f'processes={n} (workers={args.proc_workers}, {threads} torch threads)',
        'processes': n,
        'per_process': results,
        'studies': total,
        'seconds': slowest,
        'studies_per_s': total / slowest,
        'wall_s': wall,
        'studies_per_s_wall': total / wall,
        'input_wait_share': _median([r['run'] for r in results], 'input_wait_share'),
        'forward_s': sum(r['run']['forward_s'] or 0 for r in results) or None,
        'store_studies': _store_studies(store, results),
    }
    shutil.rmtree(store, ignore_errors=True)
    rows.append(row)
    print(f'  processes={n}: {json.dumps({k: v for k, v in row.items() if k != "per_process"})}')
  return rows


def _store_studies(path: str, results: list[dict]):
  """Studies the finished store holds, read back; else what the processes' commits say."""
  from jaxsae.formats import store  # pylint: disable=import-outside-toplevel

  try:
    s = store.open_store(path)
    meta = getattr(s, 'meta', None) or {}
    return {'read_back': len(s.studies()), 'meta_studies': meta.get('studies')}
  except Exception as e:  # pylint: disable=broad-except  (report, not fail: figures still count)
    return {
        'read_back': None,
        'error': f'{type(e).__name__}: {str(e)[:200]}',
        'commit_records': [r.get('commit_studies') for r in results],
    }


# -------------------------------------------------------------------------------------- report


def _holds(found: dict, expected: int) -> str:
  if found.get('read_back') is not None:
    n = found['read_back']
    return f'the store reads back {n} studies' + ('' if n == expected else f', NOT {expected}')
  return f'store not readable ({found["error"]}); commits say {found["commit_records"]}'


def _fit_two_image(prep_s: list[float], images: list[int]) -> float:
  """Preparation seconds of a two-image study: least squares a + b * images over the studies."""
  x = np.asarray(images, np.float64)
  if len(set(images)) < 2:
    return float(np.mean(prep_s)) * 2 / x.mean()
  b, a = np.polyfit(x, np.asarray(prep_s), 1)
  return float(a + 2 * b)


def report(args, parts: dict, sweep: list[dict], procs: list[dict]) -> dict:
  prep = float(np.mean(parts['prep_s']))
  fwd = parts['forward_s_per_study']
  two = _fit_two_image(parts['prep_s'], parts['images'])
  n_img = np.bincount(parts['images'], minlength=4)[1:]
  print(
      f'\n{datetime.date.today()}  {os.cpu_count()} CPU cores, torch {parts["torch_threads"]} '
      f'threads; {args.studies} studies ({n_img[0]} x 1, {n_img[1]} x 2, {n_img[2]} x 3 images, '
      f'{np.mean(parts["tokens"]):.0f} tokens on average); tiny {args.model} width {args.hidden}, '
      f'{args.layers} layers, {args.heads} heads, hook at {HOOK_LAYER[args.model]}; batch '
      f'{args.batch_size}, bucket window {args.bucket_window}; load average before/after '
      f'{args.load_before:.1f}/{os.getloadavg()[0]:.1f}'
  )
  print(
      f'preparing a study in the main process: {prep:.3f} s (two-image study {two:.3f} s); '
      f'forward pass alone: {fwd:.3f} s per study (ratio forward/prepare {fwd / prep:.2f})\n'
  )
  head = (
      f'{"setting":44s} {"studies/s":>9s} {"input wait":>10s} {"fwd s/study":>11s} '
      f'{"prep s/study":>12s} {"other s/study":>13s}'
  )
  print(head)
  print('-' * len(head))
  fmt = lambda v, w, p: f'{"-":>{w}s}' if v is None else f'{v:{w}.{p}f}'  # noqa: E731
  print(f'{"prepare only (main process)":44s} {1 / prep:9.2f} {"":>10s} {"":>11s} {prep:12.3f}')
  print(f'{"forward only (prepared batches)":44s} {1 / fwd:9.2f} {"":>10s} {fwd:11.3f}')
  for row in sweep + procs:
    n = row['studies']
    wait = row.get('input_wait_share')
    fwd_s = row.get('forward_s')
    other = None
    if fwd_s is not None and row.get('input_wait_s') is not None:
      other = (row['seconds'] - fwd_s - row['input_wait_s']) / n
    print(
        f'{row["setting"]:44s} {row["studies_per_s"]:9.2f} '
        f'{fmt(None if wait is None else 100 * wait, 9, 1)}{"%" if wait is not None else " "} '
        f'{fmt(None if fwd_s is None else fwd_s / n, 11, 3)} {fmt(prep, 12, 3)} '
        f'{fmt(other, 13, 3)}'
    )
    if 'wall_s' in row:
      print(
          f'{"  whole wall clock, model loads included":44s} {row["studies_per_s_wall"]:9.2f}'
          f'   ({row["wall_s"]:.1f} s; {_holds(row["store_studies"], args.studies)})'
      )
  need = [rate * two for rate in GPU_RATE]
  caveat = '' if args.model == 'maira2' else " (llava: its 56-px processor, not MAIRA-2's)"
  print(
      f'\nprediction for one GPU at MAIRA-2 size: preparing a two-image study takes {two:.3f} s '
      f'per core{caveat}; at {GPU_RATE[0]}-{GPU_RATE[1]} studies/s the GPU needs workers >= '
      f'{need[0]:.1f}-{need[1]:.1f}, i.e. {int(np.ceil(need[0]))}-{int(np.ceil(need[1]))} worker '
      'processes (one core each) to stay busy'
  )
  return {
      'date': str(datetime.date.today()),
      'cpu_count': os.cpu_count(),
      'args': vars(args),
      'prepare_s_per_study': prep,
      'prepare_s_two_image_study': two,
      'forward_s_per_study': fwd,
      'parts': parts,
      'workers': sweep,
      'processes': procs,
      'gpu_prediction': {'rate': GPU_RATE, 'workers_needed': need},
  }


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(',') if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The benchmark's flags (bench_io.py passes its own `argv`)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--studies', type=int, default=48)
  p.add_argument('--workers', type=_ints, default=[0, 1, 2], help='export.workers to sweep')
  p.add_argument('--repeats', type=int, default=1)
  p.add_argument('--processes', type=_ints, default=[1, 2], help='export.processes to compare')
  p.add_argument('--proc-workers', type=int, default=1, help='export.workers of each process')
  p.add_argument('--skip-processes', action='store_true')
  p.add_argument('--model', choices=('maira2', 'llava'), default='maira2')
  p.add_argument('--hidden', type=int, default=32, help="the tiny model's width")
  p.add_argument('--heads', type=int, default=1, help="its decoder's attention heads (its cost)")
  p.add_argument(
      '--forward-threads',
      type=int,
      default=1,
      help='torch threads of each exporting process: 1 leaves the other cores to the workers, as '
      'a process driving a GPU would',
  )
  p.add_argument('--layers', type=int, default=None, help='decoder layers (17 MAIRA-2, 4 LLaVA)')
  p.add_argument('--batch-size', type=int, default=4)
  p.add_argument(
      '--bucket-window',
      type=int,
      default=8,
      help='export.bucket_window; 8, not the config default 32: the first window is prepared '
      'before any forward pass, so a window as large as these runs would hide the overlap',
  )
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--dir', default=os.path.join(tempfile.gettempdir(), 'jaxsae_bench_export'))
  p.add_argument('--json', default=None, help='write every figure to this file')
  args = p.parse_args(argv)
  args.layers = args.layers or DEFAULT_LAYERS[args.model]
  if args.layers <= HOOK_LAYER[args.model]:
    p.error(f'--layers must exceed the hooked layer {HOOK_LAYER[args.model]}')
  return args


def main() -> None:
  run(parse_args())


def run(args) -> dict:
  """Generate (or reuse) the inputs under args.dir, measure, print; returns every figure."""
  t0 = time.perf_counter()
  args.load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
  root = os.path.abspath(args.dir)
  data = os.path.join(root, f'data_{args.studies}_{args.seed}')
  manifest, rows = make_data(data, args.studies, args.seed)
  model = build_model(
      os.path.join(data, f'model_{args.model}_{args.hidden}_{args.layers}_{args.heads}'),
      args.model,
      args.hidden,
      args.layers,
      args.heads,
      rows,
  )
  paths = {'manifest': manifest, 'model': model}
  import torch  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(args.forward_threads)
  c = make_config(args.model, model, manifest, os.path.join(root, 'unused'), args.hidden)
  print('measuring preparation and the forward pass apart ...', flush=True)
  parts = measure_parts(c, args.batch_size)
  print(f'export, one process, workers {args.workers} ...', flush=True)
  sweep = sweep_workers(args, paths, root)
  procs = []
  if not args.skip_processes:
    print(f'export, processes {args.processes} (subprocesses) ...', flush=True)
    procs = compare_processes(args, paths, root)
  figures = report(args, parts, sweep, procs)
  figures['bench_wall_s'] = time.perf_counter() - t0
  print(f'\nbenchmark wall time {figures["bench_wall_s"]:.0f} s')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(figures, f, indent=1, default=str)
  return figures


if __name__ == '__main__':
  main()
