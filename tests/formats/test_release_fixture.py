"""dictionary_learning's own files, both ways. Its trainer's ae.pt + config.json (the layout of
the paper's released SAEs; tests/fixtures/dictionary_learning_release, written by the reference
library through `tools/make_golden_fixture.py --release-fixture`) load into jaxsae with the
reference's encodings; jaxsae's exports load with dictionary_learning's own load_dictionary (as
SAEBench loads SAEs), run in .venv-peers, with jaxsae's encodings."""

import os
import subprocess

import numpy as np
import pytest

from helpers import REPO, write_sae
from jaxsae import weights
from jaxsae.formats import weights as weights_format

FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'dictionary_learning_release')
PEERS_PYTHON = os.path.join(REPO, '.venv-peers', 'bin', 'python')


def test_the_fixture_is_a_release_folder():
  """What the released SAEs hold: ae.pt and config.json, no safetensors and no manifest."""
  assert sorted(os.listdir(FIXTURE)) == ['ae.pt', 'config.json', 'expected.npz']


def test_jaxsae_reads_the_reference_sae():
  w = weights_format.read(FIXTURE)
  e = np.load(os.path.join(FIXTURE, 'expected.npz'))
  assert (w.layout, w.k, w.group_sizes, w.layer, w.hook_name, w.d, w.F) == (
      'dictionary_learning',
      4,
      (8, 8, 16, 32),
      15,
      'language_model.model.layers.15',
      16,
      64,
  )
  assert w.threshold.shape == () and float(w.threshold) == float(e['threshold']) > 0
  assert w.cfg['trainer']['lm_name'] == 'microsoft/maira-2'
  assert {n: a.dtype for n, a in w.params.items()} == dict.fromkeys(weights_format.PARAMS, 'f4')


def test_jaxsae_encodes_as_the_reference():
  """jaxsae.weights.load gives the reference's codes (its learned threshold, and BatchTopK with
  its k) and reconstructions."""
  sae, cfg = weights.load(FIXTURE)
  e = np.load(os.path.join(FIXTURE, 'expected.npz'))
  x = e['x']
  assert cfg['trainer']['dict_class'] == 'MatryoshkaBatchTopKSAE'
  codes = np.asarray(sae.encode(x))
  assert 0 < np.count_nonzero(codes) < codes.size  # the threshold keeps some codes, not all
  np.testing.assert_array_equal(codes > 0, e['encode'] > 0)
  np.testing.assert_allclose(codes, e['encode'], rtol=1e-6, atol=1e-6)
  scale = np.abs(e['forward']).max()  # float32 sums of terms this large: a few ulps of it
  np.testing.assert_allclose(sae(x), e['forward'], rtol=1e-6, atol=1e-6 * scale)
  topk = sae.encode(x, use_threshold=False)
  np.testing.assert_allclose(topk, e['encode_topk'], rtol=1e-6, atol=1e-6)


def _peers_python():
  if not os.path.exists(PEERS_PYTHON):
    pytest.fail(
        f'{PEERS_PYTHON} is missing: this test runs dictionary_learning there. Create it with '
        '`bash tools/install_peers.sh` (tools/test.sh does).'
    )
  return PEERS_PYTHON


@pytest.mark.torch
def test_our_ae_pt_loads_with_load_dictionary(tmp_path):
  """An export by jaxsae.formats.weights.write, loaded by the real
  dictionary_learning.utils.load_dictionary (torch.load of ae.pt, weights_only), encodes and
  reconstructs as jaxsae does; so does the release fixture, as a check of the check."""
  out = tmp_path / 'sae'
  params = write_sae(
      out,
      group_sizes=(8, 8, 16, 32),
      k=4,
      threshold=5.0,
      layer=15,
      model_name='microsoft/maira-2',
      hook_name='language_model.model.layers.15',
  )
  rng = np.random.default_rng(1)
  sae, _ = weights.load(str(out))
  x = (rng.standard_normal((64, 16)) * 2 + params['b_dec']).astype(np.float32)
  codes = np.asarray(sae.encode(x))
  assert 0 < np.count_nonzero(codes) < codes.size // 4  # the threshold drops most codes
  inputs = tmp_path / 'inputs.npz'
  np.savez(inputs, x=x, expected_encode=codes, expected_decode=np.asarray(sae(x)))
  e = np.load(os.path.join(FIXTURE, 'expected.npz'))
  fixture_inputs = tmp_path / 'fixture.npz'
  np.savez(fixture_inputs, x=e['x'], expected_encode=e['encode'], expected_decode=e['forward'])
  tool = os.path.join(REPO, 'tools', 'make_golden_fixture.py')
  for folder, npz in ((out, inputs), (FIXTURE, fixture_inputs)):
    r = subprocess.run(
        [_peers_python(), tool, '--check-load-dictionary', str(folder), '--inputs', str(npz)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "loads with dictionary_learning's load_dictionary and matches" in r.stdout
    assert 'MatryoshkaBatchTopKSAE: k=4 group_sizes=[8, 8, 16, 32]' in r.stdout


@pytest.mark.torch
def test_the_bridge_encodes_the_reference_sae_as_the_reference():
  import torch  # pylint: disable=import-outside-toplevel (torch tests only)
  from jaxsae.bridge import sae as sae_lib  # pylint: disable=import-outside-toplevel

  sae = sae_lib.load(FIXTURE)
  e = np.load(os.path.join(FIXTURE, 'expected.npz'))
  x = torch.from_numpy(e['x'])
  with torch.no_grad():
    codes, out = sae.encode(x).numpy(), sae(x).numpy()
  assert (sae.k, sae.group_sizes, sae.layer) == (4, (8, 8, 16, 32), 15)
  np.testing.assert_array_equal(codes > 0, e['encode'] > 0)
  np.testing.assert_allclose(codes, e['encode'], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out, e['forward'], rtol=1e-6, atol=1e-6 * np.abs(e['forward']).max())
