"""The bridge's torch SAE reads both exported layouts and agrees with the JAX model."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, tiny_config
from jaxsae import config as config_lib
from jaxsae import weights
from jaxsae.bridge import sae as sae_lib
from jaxsae.config import ConfigError
from jaxsae.formats import weights as weights_format

pytestmark = pytest.mark.torch


def write_random(out, d=24, F=96, per_latent=False, seed=0, layer=2, sizes=(24, 24, 48)):
  """A random SAE written in dictionary_learning's layout (scalar threshold) or SAELens's
  (per-latent threshold); returns its numpy tensors."""
  rng = np.random.default_rng(seed)
  W_dec = rng.standard_normal((F, d)).astype(np.float32)
  W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
  p = {
      'W_enc': (W_dec.T + 0.1 * rng.standard_normal((d, F))).astype(np.float32),
      'b_enc': (0.1 * rng.standard_normal(F)).astype(np.float32),
      'W_dec': W_dec,
      'b_dec': (0.5 * rng.standard_normal(d)).astype(np.float32),
  }
  os.makedirs(out, exist_ok=True)
  if per_latent:
    theta = rng.uniform(0.05, 0.6, F).astype(np.float32)
    cfg = {
        'architecture': 'jumprelu',
        'd_in': d,
        'd_sae': F,
        'hook_name': 'h',
        'metadata': {'jaxsae': {'k': 4, 'group_sizes': list(sizes), 'layer': layer}},
    }
    weights_format.write_files(
        out, weights_format.SL_WEIGHTS, {**p, 'threshold': theta}, weights_format.SL_CONFIG, cfg
    )
  else:
    theta = np.array(0.3, np.float32)
    tensors = {
        **p,
        'k': np.array(4, np.int32),
        'threshold': theta,
        'group_sizes': np.array(sizes, np.int64),
    }
    weights_format.write_files(
        out,
        weights_format.DL_WEIGHTS,
        tensors,
        weights_format.DL_CONFIG,
        {'trainer': {'layer': layer, 'submodule_name': 'h', 'k': 4}},
    )
  return {**p, 'threshold': theta}


def assert_matches_jax(path, x):
  jax_sae, _ = weights.load(path)
  t_sae = sae_lib.load(path)
  acts_j = np.array(jax_sae.encode(x))
  with torch.no_grad():
    acts_t = t_sae.encode(torch.from_numpy(x)).numpy()
    recon_t = t_sae.decode(torch.from_numpy(acts_j)).numpy()
  np.testing.assert_allclose(acts_t, acts_j, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon_t, np.asarray(jax_sae.decode(acts_j)), rtol=1e-5, atol=1e-5)
  assert (acts_j > 0).any() and (acts_j == 0).any()  # the threshold really selects
  return t_sae


@pytest.mark.parametrize('per_latent', [False, True], ids=['dictionary_learning', 'saelens'])
def test_matches_jax_on_written_layouts(tmp_path, per_latent):
  p = write_random(str(tmp_path), per_latent=per_latent)
  x = np.random.default_rng(1).standard_normal((200, 24)).astype(np.float32)
  t_sae = assert_matches_jax(str(tmp_path), x)
  assert (t_sae.d, t_sae.F, t_sae.group_sizes, t_sae.layer) == (24, 96, (24, 24, 48), 2)
  assert t_sae.threshold.ndim == (1 if per_latent else 0)
  # The math written out: relu((x - b_dec) W_enc + b_enc), kept above theta.
  pre = np.maximum((x - p['b_dec']) @ p['W_enc'] + p['b_enc'], 0)
  want = np.where(pre > p['threshold'], pre, 0)
  with torch.no_grad():
    np.testing.assert_allclose(t_sae.encode(torch.from_numpy(x)).numpy(), want, atol=1e-5)
    prefixes = t_sae.prefix_reconstructions(torch.from_numpy(want)).numpy()
  np.testing.assert_allclose(prefixes[0], want[:, :24] @ p['W_dec'][:24] + p['b_dec'], atol=1e-5)
  np.testing.assert_allclose(prefixes[-1], want @ p['W_dec'] + p['b_dec'], atol=1e-5)


@pytest.mark.slow
def test_matches_jax_after_training_and_export(tmp_path):
  """A trained SAE through the real export (activation scale folded in), both layouts: the
  bridge's torch module holds exactly what jaxsae.formats.weights reads (numpy), and computes
  what the JAX model loaded from the same directory computes."""
  c = tiny_config(**{'train.steps': 20, 'optim.decay_start': 15})
  from jaxsae import trainer

  trainer.train_and_evaluate(c, str(tmp_path / 'run'))
  x = np.random.default_rng(2).standard_normal((300, 16)).astype(np.float32) * 3
  for fmt in weights.FORMATS:
    out = str(tmp_path / fmt)
    weights.export(str(tmp_path / 'run'), out, fmt)
    t_sae = assert_matches_jax(out, x)
    assert t_sae.group_sizes == config_lib.group_sizes(c) and t_sae.k == c.sae.k
    w = weights_format.read(out)
    assert w.layout == fmt
    for name, value in {**w.params, 'threshold': w.threshold}.items():
      t = getattr(t_sae, name)
      assert t.dtype == torch.float32 and tuple(t.shape) == value.shape, name
      np.testing.assert_array_equal(t.numpy(), value, err_msg=name)
    assert (
        (t_sae.k, t_sae.group_sizes, t_sae.layer, t_sae.hook_name)
        == (w.k, w.group_sizes, w.layer, w.hook_name)
        == (c.sae.k, config_lib.group_sizes(c), c.model.layer, c.model.hook_name)
    )


def test_load_errors(tmp_path):
  with pytest.raises(ConfigError, match='ae.safetensors.*sae_weights.safetensors'):
    sae_lib.load(str(tmp_path))
  write_random(str(tmp_path / 'sl'), per_latent=True)
  cfg = tmp_path / 'sl' / 'cfg.json'
  cfg.write_text(cfg.read_text().replace('"jumprelu"', '"topk"'))
  with pytest.raises(ConfigError, match="architecture 'topk' is not supported"):
    sae_lib.load(str(tmp_path / 'sl'))
  write_random(str(tmp_path / 'dl'))
  os.remove(tmp_path / 'dl' / 'config.json')
  with pytest.raises(ConfigError, match='config.json is missing'):
    sae_lib.load(str(tmp_path / 'dl'))
  t = sae_lib.TorchSAE(torch.zeros(4, 8), torch.zeros(8), torch.zeros(8, 4), torch.zeros(4), 0.0)
  with pytest.raises(ConfigError, match=r'feature 8 is out of range.*F=8.*0\.\.7'):
    t.check_features([3, 8])
  with pytest.raises(ConfigError, match='inconsistent shapes'):
    sae_lib.TorchSAE(torch.zeros(4, 8), torch.zeros(8), torch.zeros(4, 8), torch.zeros(4), 0.0)


def test_reads_bfloat16_weights(tmp_path):
  """numpy has no bfloat16; the shared reader still reads such files (torch-saved SAEs often are)."""
  from safetensors.torch import save_file

  p = write_random(str(tmp_path))
  bf16 = {n: torch.from_numpy(np.asarray(v)).to(torch.bfloat16) for n, v in p.items()}
  save_file(
      {**bf16, 'k': torch.tensor(4, dtype=torch.int32), 'group_sizes': torch.tensor([24, 24, 48])},
      str(tmp_path / 'ae.safetensors'),
  )
  t_sae = sae_lib.load(str(tmp_path), dtype=torch.bfloat16)
  for name, value in bf16.items():
    assert torch.equal(getattr(t_sae, name), value), name


def test_torch_side_needs_no_jax(tmp_path):
  write_random(str(tmp_path))
  code = f"""
import sys, torch
sys.path.insert(0, {REPO!r})
from jaxsae.bridge import sae

s = sae.load({str(tmp_path)!r})
s(torch.randn(3, 24))
bad = [m for m in sys.modules if m == "jax" or m.startswith(("jax.", "jaxlib", "flax"))]
assert not bad, bad[:5]
print("ok")
"""
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and 'ok' in r.stdout, r.stderr[-2000:]
