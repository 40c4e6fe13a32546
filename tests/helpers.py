"""Builders the tests share: tiny configs, the real command lines, random SAEs, stores, the tiny
model and its studies."""

import contextlib
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, 'tools')
SYNTHETIC = os.path.join(REPO, 'experiments', 'synthetic.py')

# A few-second synthetic run: every code path (warmup, decay, threshold EMA, AuxK) within 40 steps.
TINY = {
    'sae.d': 16,
    'sae.expansion_factor': 4,
    'sae.k': 4,
    'data.batch_size': 64,
    'data.synthetic.n_features': 32,
    'data.synthetic.mean_active': 3.0,
    'data.synthetic.n_parents': 2,
    'data.synthetic.children_per_parent': 2,
    'data.scale_estimate_batches': 2,
    'sae.threshold_start_step': 10,
    'sae.dead_tokens_threshold': 256,
    'optim.lr': 3e-3,
    'optim.warmup_steps': 5,
    'optim.decay_start': 30,
    'train.steps': 40,
    'train.log_every': 10,
    'train.checkpoint_every': 5,
    'train.progress_bar': False,
}


def tiny_config(**overrides):
  """The synthetic experiment shrunk to TINY, as a ConfigDict (for in-process tests)."""
  sys.path.insert(0, REPO)
  from experiments import synthetic  # pylint: disable=import-outside-toplevel

  c = synthetic.get_config()
  for key, value in {**TINY, **overrides}.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def cli_args(module, config=SYNTHETIC, workdir=None, **overrides):
  """argv for `python -m module --config=... --workdir=... --config.a.b=v` with TINY applied."""
  args = [sys.executable, '-m', module, f'--config={config}']
  if workdir is not None:
    args.append(f'--workdir={workdir}')
  args += [f'--config.{k}={v}' for k, v in {**TINY, **overrides}.items()]
  return args


def run_cli(args, env_extra=None, **kw):
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu', **(env_extra or {})}
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kw)


# --------------------------------------------------------------------------------------------------
# Kernel tests (tests/kernels/): a random SAE with non-zero biases, its selected codes
# --------------------------------------------------------------------------------------------------


def random_sae(group_sizes, B, d, seed=0):
  """(params, x): unit decoder rows, small random biases, a standard-normal batch."""
  import jax  # pylint: disable=import-outside-toplevel (the CLI tests need no JAX here)
  from jaxsae import model  # pylint: disable=import-outside-toplevel

  kp, kx, kb = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = model.init_params(kp, d, sum(group_sizes))
  params['b_dec'] = 0.1 * jax.random.normal(kb, (d,))
  params['b_enc'] = 0.05 * jax.random.normal(kb, (sum(group_sizes),))
  return params, jax.random.normal(kx, (B, d))


def selected_candidates(params, x, k, kc):
  """The sparse kernels' input: each token's top-kc candidates, zero where BatchTopK drops them
  (asserting the candidates provably hold the whole selection), and the threshold."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxsae import model, selection  # pylint: disable=import-outside-toplevel

  pre = model.pre_activations(params, x)
  vals, idx, tau, proven = selection.candidates_and_threshold(pre, k, kc)
  assert bool(proven)
  return jnp.where((vals >= tau) & (vals > 0), vals, 0.0), idx, tau


def step_config(group_sizes, group_weights, **overrides):
  """A StepConfig with AuxK effectively off (nothing goes dead) unless overridden."""
  from jaxsae import train_step  # pylint: disable=import-outside-toplevel

  fields = dict(
      k=4,
      group_sizes=tuple(group_sizes),
      group_weights=tuple(group_weights),
      auxk_alpha=1 / 32,
      top_k_aux=12,
      dead_tokens_threshold=10**9,
      threshold_beta=0.999,
      threshold_start_step=0,
      candidates_per_row=8,
      skip_nonfinite=False,
  )
  return train_step.StepConfig(**{**fields, **overrides})


# --------------------------------------------------------------------------------------------------
# Activation stores (tests/formats/, tests/data/, tests/bridge/test_export_activations.py)
# --------------------------------------------------------------------------------------------------


def write_store(
    path,
    rows_per_study,
    d=16,
    dtype='float32',
    seed=0,
    rows_per_shard=64,
    rows_per_chunk=8,
    info=None,
):
  """A store of random rows, one study per entry of `rows_per_study`; returns the float32 rows
  (as stored, after any bfloat16 rounding) in store order."""
  import ml_dtypes
  import numpy as np
  from jaxsae.formats import store
  from jaxsae.formats.tokens import TOKEN_COLUMNS

  rng = np.random.default_rng(seed)
  w = store.StoreWriter(
      str(path),
      d,
      dtype,
      info or {'test': True},
      rows_per_chunk=rows_per_chunk,
      rows_per_shard=rows_per_shard,
  )
  out = []
  for i, n in enumerate(rows_per_study):
    x = (rng.standard_normal((n, d)) * 3 + 1).astype(np.float32)
    tokens = np.zeros((n, len(TOKEN_COLUMNS)), np.int32)
    tokens[:, 0], tokens[:, 1] = i, np.arange(n)
    w.append(x, tokens, [{'study_id': f's{i}', 'manifest_index': i, 'row_start': 0, 'rows': n}])
    out.append(x.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == 'bfloat16' else x)
  w.close()
  return np.concatenate(out) if out else np.zeros((0, d), np.float32)


def kill_repeatedly(args, started, times, rng, env_extra=None, max_wait=120, window=(0.0, 0.6)):
  """Start `args` and SIGKILL it at a random moment once `started()` is true, up to `times` times
  (fewer if it finishes first); returns how many kills landed."""
  import signal
  import time

  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu', **(env_extra or {})}
  kills = 0
  for _ in range(times):
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + max_wait
    while time.time() < deadline and proc.poll() is None and not started():
      time.sleep(0.02)
    time.sleep(rng.uniform(*window))
    if proc.poll() is not None:
      break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills += 1
  return kills


# --------------------------------------------------------------------------------------------------
# The tiny LLaVA stand-in, its studies, and SAEs for the torch bridge (tests/bridge/, tests/interpret/)
# --------------------------------------------------------------------------------------------------

LAYER, D = 2, 64


def build_tiny(root, studies=4):
  """Synthetic studies + the tiny model (tools/make_demo_data.py); returns the demo config
  pointing at them."""
  sys.path.insert(0, TOOLS)
  sys.path.insert(0, REPO)
  import make_demo_data  # pylint: disable=import-outside-toplevel
  from experiments import demo  # pylint: disable=import-outside-toplevel
  from jaxsae.bridge import tiny_model  # pylint: disable=import-outside-toplevel

  rows = make_demo_data.make_studies(str(root), studies, seed=0)
  tiny_model.build(
      os.path.join(root, 'model'),
      tiny_model.words(make_demo_data.vocabulary_texts(rows)),
      hidden=D,
      layers=4,
  )
  c = demo.get_config()
  c.model.name = os.path.join(root, 'model')
  c.export.manifest = os.path.join(root, 'manifest.jsonl')
  c.data.store_path = os.path.join(root, 'no_store')
  return c


def build_tiny_maira2(root, studies=8):
  """Synthetic studies + a tiny MAIRA-2 in the release's on-disk layout; returns the demo config
  (its maira2 variant: decoder layer 15) pointing at them."""
  sys.path.insert(0, TOOLS)
  sys.path.insert(0, REPO)
  import make_demo_data  # pylint: disable=import-outside-toplevel
  from experiments import demo  # pylint: disable=import-outside-toplevel
  from jaxsae.bridge.maira2 import checkpoint  # pylint: disable=import-outside-toplevel

  rows = make_demo_data.make_studies(str(root), studies, seed=0)
  checkpoint.build(os.path.join(root, 'model'), make_demo_data.vocabulary_texts(rows), hidden=D)
  c = demo.get_config('maira2')
  c.model.name = os.path.join(root, 'model')
  c.export.manifest = os.path.join(root, 'manifest.jsonl')
  c.data.store_path = os.path.join(root, 'no_store')
  return c


def random_torch_sae(d=D, F=128, seed=0, threshold=0.0):
  import torch  # pylint: disable=import-outside-toplevel (torch tests only)
  from jaxsae.bridge.sae import TorchSAE  # pylint: disable=import-outside-toplevel

  g = torch.Generator().manual_seed(seed)
  W_dec = torch.randn(F, d, generator=g)
  W_dec /= W_dec.norm(dim=1, keepdim=True)
  return TorchSAE(
      W_dec.T.clone(),
      torch.zeros(F),
      W_dec,
      0.01 * torch.randn(d, generator=g),
      threshold,
      k=8,
      group_sizes=[F // 4, F - F // 4],
      layer=LAYER,
  )


def exact_torch_sae(d=D):
  """Latents relu(x) and relu(-x), decoded by +I and -I: reconstructs every x exactly."""
  import torch  # pylint: disable=import-outside-toplevel (torch tests only)
  from jaxsae.bridge.sae import TorchSAE  # pylint: disable=import-outside-toplevel

  eye = torch.eye(d)
  return TorchSAE(
      torch.cat([eye, -eye], 1),
      torch.zeros(2 * d),
      torch.cat([eye, -eye], 0),
      torch.zeros(d),
      0.0,
      k=d,
      group_sizes=[d, d],
      layer=LAYER,
  )


def write_dictionary_learning(out, sae, layer=LAYER):
  """A TorchSAE in dictionary_learning's layout (jaxsae.weights' names and config keys)."""
  import json  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel

  os.makedirs(out, exist_ok=True)
  tensors = {n: getattr(sae, n).contiguous() for n in ('W_enc', 'b_enc', 'W_dec', 'b_dec')}
  tensors.update(
      k=torch.tensor(sae.k, dtype=torch.int32),
      threshold=sae.threshold.clone(),
      group_sizes=torch.tensor(sae.group_sizes, dtype=torch.int64),
  )
  save_file(tensors, os.path.join(out, 'ae.safetensors'))
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump({'trainer': {'layer': layer, 'k': sae.k, 'dict_size': sae.F}}, f)
  return out


# --------------------------------------------------------------------------------------------------
# A full disk (tests/formats/test_weights.py, tests/training/test_checkpoint_safety.py)
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path, size='1M', inodes=None):
  """A size-limited tmpfs mounted at `path` (made if missing) for the block: yields True, or False
  where this machine does not allow mounting (not root, no mount), and the caller then simulates
  ENOSPC instead. Unmounted afterwards."""
  os.makedirs(path, exist_ok=True)
  options = f'size={size}' + (f',nr_inodes={inodes}' if inodes else '')
  mounted = False
  if hasattr(os, 'geteuid') and os.geteuid() == 0:
    try:
      cmd = ['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)]
      mounted = subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
      pass
  try:
    yield mounted
  finally:
    if mounted and subprocess.run(['umount', str(path)], capture_output=True).returncode:
      subprocess.run(['umount', '-l', str(path)], capture_output=True)


def fill_disk(folder):
  """Write a ballast file into `folder` until its filesystem is full; returns the file's path."""
  path = os.path.join(folder, 'ballast')
  try:
    with open(path, 'wb') as f:
      while True:
        f.write(b'\0' * 4096)
        f.flush()
  except OSError:
    pass
  return path


def check_iterator_resumes(src, first: int, later: int) -> None:
  """A source's grain iterator, checkpointed after `first` batches (which equal src.batch(i)) and
  restored into a fresh iterator, yields the same next `later` batches."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  it = src.iterator()
  for i in range(first):
    np.testing.assert_array_equal(next(it), src.batch(i))
  state = it.get_state()
  expected = [next(it) for _ in range(later)]
  it.close()
  resumed = src.iterator()
  resumed.set_state(state)
  for batch in expected:
    np.testing.assert_array_equal(next(resumed), batch)
  resumed.close()


# --------------------------------------------------------------------------------------------------
# A pre-filled Hugging Face Hub cache (tests/formats/test_hub.py, tests/training/test_init_from.py)
# --------------------------------------------------------------------------------------------------

HUB_COMMIT = '0123456789abcdef0123456789abcdef01234567'


def write_hub_cache(cache, repo_id, folders, commit=HUB_COMMIT, refs=('main',)):
  """Put local folders into `cache` as huggingface_hub's snapshot_download would have left them:
  models--ORG--NAME/blobs/<sha256> holding the bytes, snapshots/<commit>/<subfolder>/<file>
  relative symlinks to them, refs/<name> holding the commit. `folders` maps a subfolder of the
  repository ('' = its root) to a local folder whose files it holds. Returns the snapshot folder."""
  import hashlib  # pylint: disable=import-outside-toplevel

  repo = os.path.join(str(cache), 'models--' + repo_id.replace('/', '--'))
  blobs, snapshot = os.path.join(repo, 'blobs'), os.path.join(repo, 'snapshots', commit)
  os.makedirs(blobs, exist_ok=True)
  for sub, src in folders.items():
    dest = os.path.join(snapshot, *sub.split('/')) if sub else snapshot
    os.makedirs(dest, exist_ok=True)
    for name in sorted(os.listdir(src)):
      data = open(os.path.join(src, name), 'rb').read()
      blob = os.path.join(blobs, hashlib.sha256(data).hexdigest())
      with open(blob, 'wb') as f:
        f.write(data)
      link = os.path.join(dest, name)
      os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
  os.makedirs(os.path.join(repo, 'refs'), exist_ok=True)
  for ref in refs:
    with open(os.path.join(repo, 'refs', ref), 'w') as f:
      f.write(commit)  # no newline, as huggingface_hub writes it
  return snapshot


def write_sae(out, layout='dictionary_learning', d=16, group_sizes=(4, 4, 8, 16, 32), k=4,
              threshold=0.3, seed=0, row_norm=1.0, **meta):  # fmt: skip
  """A random SAE acting on raw activations written by jaxsae.formats.weights.write (decoder rows
  of norm `row_norm`, W_enc near W_dec^T, non-zero biases); returns its float32 parameters."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxsae.formats import weights as weights_format  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  F = sum(group_sizes)
  W_dec = rng.standard_normal((F, d))
  W_dec *= row_norm / np.linalg.norm(W_dec, axis=1, keepdims=True)
  p = {
      'W_enc': W_dec.T + 0.1 * rng.standard_normal((d, F)),
      'b_enc': 0.1 * rng.standard_normal(F),
      'W_dec': W_dec,
      'b_dec': 0.5 * rng.standard_normal(d),
  }
  p = {n: v.astype(np.float32) for n, v in p.items()}
  fields = dict(step=100, scale=1.0, layer=15, model_name='m', hook_name='h', training={})
  fields.update(meta)
  weights_format.write(
      str(out),
      layout,
      p,
      threshold,
      weights_format.Metadata(k=k, group_sizes=tuple(group_sizes), **fields),
  )
  return p


def card_parts(text):
  """A model card's (YAML front matter as a dict, body); the card must open with a `---` block."""
  import re
  import yaml

  match = re.fullmatch(r'---\n(.*?)\n---\n(.*)', text, re.DOTALL)
  assert match, text[:200]
  return yaml.safe_load(match[1]), match[2]


def card_row(body, label):
  """The value cell of the model card's table row starting with `label`."""
  import re

  found = re.findall(rf'^\| {re.escape(label)} \| (.*) \|$', body, re.MULTILINE)
  assert len(found) == 1, (label, found)
  return found[0]


# An easy planted dictionary (no hierarchy, flat frequencies) that a short run recovers: the
# overrides tests/training/test_training.py and test_mixed_precision.py train with.
PLANTED = {
    'sae.d': 32,
    'sae.expansion_factor': 2,
    'sae.k': 3,
    'data.synthetic.n_features': 32,
    'data.synthetic.mean_active': 3.0,
    'data.synthetic.n_parents': 0,
    'data.synthetic.zipf_exponent': 0.0,
    'data.batch_size': 256,
    'optim.lr': 1e-2,
}


def demo_config(demo_dir, store_path, **overrides):
  """experiments/demo.py's config on the demo studies in `demo_dir` (tests/bridge's `demo`
  fixture), exporting to `store_path`; overrides as {'export.batch_size': 2, ...}."""
  sys.path.insert(0, REPO)
  from experiments import demo as demo_experiment  # pylint: disable=import-outside-toplevel

  c = demo_experiment.get_config()
  c.model.name = str(demo_dir / 'model')
  c.export.manifest = str(demo_dir / 'manifest.jsonl')
  c.data.store_path = str(store_path)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def repeated_manifest(demo_dir, tmp_path, times):
  """The demo studies `times` over, under new ids: enough work to be killed in the middle of."""
  import json  # pylint: disable=import-outside-toplevel

  from jaxsae.bridge import manifest  # pylint: disable=import-outside-toplevel

  lines = [json.loads(l) for l in open(demo_dir / 'manifest.jsonl')]
  path = tmp_path / 'many.jsonl'
  with open(path, 'w') as f:
    for r in range(times):
      for line in lines:
        line = {
            k: (str(demo_dir / v) if k in manifest.IMAGE_FIELDS and v else v)
            for k, v in line.items()
        }
        f.write(json.dumps({**line, 'study_id': f'{line["study_id"]}-{r}'}) + '\n')
  return path, [f'{l["study_id"]}-{r}' for r in range(times) for l in lines]


def write_parted_store(path, sizes_per_part, d=16, seed=0, info=None):
  """A store written as by len(sizes_per_part) export processes: part i holds one study per entry
  of sizes_per_part[i] (random rows, study ids s0, s1, ... in manifest order); returns the rows in
  the store's order."""
  import numpy as np
  from jaxsae.formats import parts, store
  from jaxsae.formats.tokens import TOKEN_COLUMNS

  count, info = len(sizes_per_part), info or {'test': True}
  studies = sum(len(s) for s in sizes_per_part)
  parts.claim(str(path), count, studies, d, 'float32', info, 8, 64)
  rng, out, first = np.random.default_rng(seed), [], 0
  for i, sizes in enumerate(sizes_per_part):
    assert parts.shares(studies, count)[i][0] == first, 'sizes must follow the shares'
    w = store.StoreWriter(store.part_path(str(path), i, count), d, 'float32', info, 8, 64)
    for n in sizes:
      x = (rng.standard_normal((n, d)) * 3 + 1).astype(np.float32)
      t = np.zeros((n, len(TOKEN_COLUMNS)), np.int32)
      t[:, 0], t[:, 1] = first, np.arange(n)
      w.append(x, t, [{'study_id': f's{first}', 'manifest_index': first, 'row_start': 0,
                       'rows': n}])  # fmt: skip
      out.append(x)
      first += 1
    w.close()
  return np.concatenate(out)


def processes_naming(text):
  """The live processes whose command line contains `text` (killed commands' leftovers)."""
  out = []
  for pid in os.listdir('/proc'):
    if pid.isdigit():
      try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
          cmd = f.read().decode(errors='replace')
      except OSError:
        continue
      if text in cmd:
        out.append(int(pid))
  return out


def run_on_devices(code, devices, timeout=300):
  """Run Python `code` in a fresh process with `devices` simulated CPU devices; it must print
  'ok' (the rest of the suite keeps one device)."""
  env = {
      'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
      'JAX_PLATFORMS': 'cpu',
      'PYTHONPATH': REPO,
  }
  r = subprocess.run(
      [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=timeout
  )
  assert r.returncode == 0 and 'ok' in r.stdout, r.stderr[-3000:]
