"""Hub ids (hf://ORG/NAME[/SUBFOLDER][@REVISION]) load SAEs from the Hugging Face cache, offline
included, and every way one can fail is a ConfigError that says what to do. No network: the cache
is pre-filled in huggingface_hub's own layout, and the Hub's answers are stood in for."""

import os
import re

import types

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import utils as hf_utils

from helpers import HUB_COMMIT, write_hub_cache, write_sae
from jaxsae import config as config_lib
from jaxsae import weights
from jaxsae.config import ConfigError
from jaxsae.formats import hub

REPO_ID = 'org/sae'


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """A Hub cache holding REPO_ID at HUB_COMMIT (refs main and v1) with SAEs in ef2/ and ef4/ (and
  a stray file at the root), used offline; returns (cache folder, {subfolder: local copy})."""
  local = {}
  for i, sub in enumerate(('ef2', 'ef4')):
    local[sub] = str(tmp_path / 'src' / sub)
    write_sae(local[sub], seed=i, group_sizes=(8, 8 * (i + 1)))
  (tmp_path / 'readme').mkdir()
  (tmp_path / 'readme' / 'README.md').write_text('SAEs')
  folder = str(tmp_path / 'hub')
  write_hub_cache(folder, REPO_ID, {**local, '': str(tmp_path / 'readme')}, refs=('main', 'v1'))
  monkeypatch.setenv('HF_HUB_CACHE', folder)
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  return folder, local


def _codes(path, x):
  sae, _ = weights.load(path)
  return np.asarray(sae.encode(x))


def test_the_test_cache_has_huggingface_hubs_layout(cache):
  """huggingface_hub's own cache scanner reads the pre-filled cache as one it wrote."""
  folder, local = cache
  info = huggingface_hub.scan_cache_dir(folder)
  assert not info.warnings, info.warnings
  (repo,) = info.repos
  assert (repo.repo_id, repo.repo_type) == (REPO_ID, 'model')
  (revision,) = repo.revisions
  assert revision.commit_hash == HUB_COMMIT and revision.refs == frozenset({'main', 'v1'})
  files = sorted(str(f.file_path.relative_to(revision.snapshot_path)) for f in revision.files)
  assert files == ['README.md'] + sorted(f'{s}/{n}' for s in local for n in os.listdir(local[s]))


@pytest.mark.parametrize('suffix', ['', '@main', '@v1', f'@{HUB_COMMIT}'])
def test_a_hub_id_loads_the_cached_sae_offline(cache, suffix):
  _, local = cache
  x = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
  for sub, path in local.items():
    spec = f'hf://{REPO_ID}/{sub}{suffix}'
    location = hub.locate(spec)
    assert location.commit == HUB_COMMIT and location.dir.endswith(os.path.join(HUB_COMMIT, sub))
    codes = _codes(spec, x)
    assert (codes > 0).any()
    np.testing.assert_array_equal(codes, _codes(path, x))
  assert hub.resolve('/some/local/folder') == '/some/local/folder'  # paths pass through


@pytest.mark.parametrize(
    'spec, message',
    [
        (
            f'hf://{REPO_ID}/ef8',
            r'hf://org/sae/ef8: the cached copy of org/sae \(commit 0123.*\) in .*hub has no folder '
            r"'ef8' \(SAE folders: ef2, ef4\), and offline mode \(HF_HUB_OFFLINE\) forbids .*"
            r"`hf download org/sae --include 'ef8/\*'`",
        ),
        (
            'hf://org/other/ef4',
            r'hf://org/other/ef4: org/other \(folder ef4\) is not in the Hugging Face cache at '
            r'.*hub, and offline mode .*forbids downloading it\. Fetch it once with `hf download '
            r"org/other --include 'ef4/\*'` with network access",
        ),
        (
            f'hf://{REPO_ID}/ef4@v2',
            r'org/sae \(folder ef4\) at revision v2 is not in the Hugging Face cache.*'
            r"--include 'ef4/\*' --revision v2`",
        ),
        (f'hf://{REPO_ID}/ef4@{"f" * 40}', r'at revision f{40} is not in the Hugging Face cache'),
    ],
    ids=['subfolder', 'repo', 'revision', 'commit'],
)
def test_what_the_cache_lacks_offline_is_named_with_the_fetch_command(cache, spec, message):
  with pytest.raises(ConfigError, match=message):
    weights.load(spec)


def test_the_cache_folder_and_offline_mode_are_read_at_each_call(cache, tmp_path, monkeypatch):
  """Not frozen when huggingface_hub was imported: another HF_HUB_CACHE is another cache."""
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'elsewhere'))
  with pytest.raises(ConfigError, match=r'not in the Hugging Face cache at .*elsewhere'):
    hub.resolve(f'hf://{REPO_ID}/ef4')
  monkeypatch.delenv('HF_HUB_CACHE')
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'home'))
  with pytest.raises(ConfigError, match=r'not in the Hugging Face cache at .*home/hub'):
    hub.resolve(f'hf://{REPO_ID}/ef4')


@pytest.mark.parametrize(
    'spec, ref',
    [
        ('hf://microsoft/maira-2-sae/ef4', ('microsoft/maira-2-sae', 'ef4', None)),
        ('hf://microsoft/maira-2-sae', ('microsoft/maira-2-sae', '', None)),
        ('hf://o/n/a/b/@v1.0', ('o/n', 'a/b', 'v1.0')),
        ('hf://o/n/ef4@refs/pr/3', ('o/n', 'ef4', 'refs/pr/3')),
    ],
)
def test_parse(spec, ref):
  parsed = hub.parse(spec)
  assert (parsed.repo_id, parsed.subfolder, parsed.revision) == ref
  assert re.fullmatch(hub.SPEC_PATTERN, spec)


@pytest.mark.parametrize(
    'spec, message',
    [
        ('hf://org', r'does not name a repository \(ORG/NAME\)'),
        ('hf://org/sae//ef4', r'does not name a repository'),
        ('hf://org/sae/../x', r'does not name a repository'),
        ('hf://org/sae/ef4@', r'the revision after "@" is empty'),
        ('hf://org/sae@a/ef4@b', r'the revision after "@" is ambiguous'),
        ('hf://-org/sae', r"'-org' is not a valid Hub user or repository name"),
    ],
)
def test_malformed_ids_are_refused_before_any_lookup(spec, message, monkeypatch):
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', _never)
  with pytest.raises(ConfigError, match=message):
    hub.resolve(spec)


def test_init_from_takes_a_hub_id_a_folder_or_nothing():
  c = config_lib.default_config()
  for ok in ('', 'hf://microsoft/maira-2-sae/ef4@main', '/data/sae', 'runs/ef4'):
    c.train.init_from = ok
    config_lib.validate(c)
  c.train.init_from = 'hf://maira-2-sae'
  with pytest.raises(ConfigError, match=r'train.init_from=.*is malformed.*hf://ORG/NAME'):
    config_lib.validate(c)


def _never(*args, **kwargs):
  raise AssertionError('snapshot_download must not be called')


# --------------------------------------------------------------------------------------------------
# Online: what is asked of the Hub, and its refusals (stood in for: no network in tests)
# --------------------------------------------------------------------------------------------------


def _raises(error):
  """A snapshot_download that fails with `error`."""

  def download(*args, **kwargs):
    raise error

  return download


def _http_error(cls, status):
  response = types.SimpleNamespace(status_code=status, headers={}, request=None)
  return _raises(cls(f'{status} Client Error', response=response))


@pytest.fixture
def online(cache, monkeypatch):
  monkeypatch.delenv('HF_HUB_OFFLINE')
  monkeypatch.delenv('TRANSFORMERS_OFFLINE', raising=False)
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
  return cache


def test_only_the_subfolders_own_files_are_asked_for_at_the_pinned_revision(online, monkeypatch):
  folder, _ = online
  calls = []

  def fake(repo_id, **kwargs):
    calls.append((repo_id, kwargs))
    return os.path.join(folder, 'models--org--sae', 'snapshots', HUB_COMMIT)

  monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake)
  hub.resolve(f'hf://{REPO_ID}/ef4@v1')
  ((repo_id, kw),) = calls
  assert repo_id == REPO_ID
  assert (kw['repo_type'], kw['revision'], kw['cache_dir'], kw['local_files_only']) == (
      'model',
      'v1',
      folder,
      False,
  )
  files = ['ef4/ae.pt', 'ef4/config.json', 'ef4/checkpoints/ae_1000.pt', 'ef2/ae.pt', 'README.md']
  chosen = hf_utils.filter_repo_objects(
      files, allow_patterns=kw['allow_patterns'], ignore_patterns=kw['ignore_patterns']
  )
  assert list(chosen) == ['ef4/ae.pt', 'ef4/config.json']
  calls.clear()
  hub.resolve(f'hf://{REPO_ID}/ef4')
  assert calls[0][1]['revision'] is None  # the repository's default branch


def test_an_absent_folder_online_names_the_repos_sae_folders(online, monkeypatch):
  folder, _ = online
  snapshot = os.path.join(folder, 'models--org--sae', 'snapshots', HUB_COMMIT)
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', lambda *a, **k: snapshot)
  with pytest.raises(
      ConfigError,
      match=r'org/sae at commit 0123.* has no folder .ef16. \(SAE folders: ef2, ef4\)\. Check the '
      r'folder name on https://huggingface.co/org/sae/tree/0123',
  ):
    weights.load(f'hf://{REPO_ID}/ef16')


@pytest.mark.parametrize(
    'error, message',
    [
        (
            _http_error(hf_utils.GatedRepoError, 403),
            r'org/sae is gated and this machine has no access to it\. Accept its terms on '
            r'https://huggingface.co/org/sae .*`hf auth login` \(or set HF_TOKEN\)',
        ),
        (
            _http_error(hf_utils.RepositoryNotFoundError, 401),
            r'there is no model repository org/sae on the Hub, or it is private',
        ),
        (_http_error(hf_utils.RevisionNotFoundError, 404), r"org/sae has no revision 'v9'"),
        (_http_error(hf_utils.HfHubHTTPError, 401), r'the download from the Hub is not authorised'),
        (_http_error(hf_utils.HfHubHTTPError, 503), r'the download from the Hub failed: 503'),
        (
            _raises(hf_utils.LocalEntryNotFoundError('no network')),
            r'the Hub cannot be reached \(no network\) and org/sae \(folder ef4\) at revision v9 is '
            r'not in the Hugging Face cache',
        ),
        (
            _raises(OSError(28, 'No space left on device')),
            r'cannot download into the Hugging Face cache at .*No space left',
        ),
    ],
    ids=['gated', 'absent', 'revision', 'unauthorised', 'hub_down', 'no_network', 'disk_full'],
)
def test_hub_refusals_are_config_errors(online, monkeypatch, error, message):
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', error)
  with pytest.raises(ConfigError, match=r'^hf://org/sae/ef4@v9: ' + message):
    weights.load(f'hf://{REPO_ID}/ef4@v9')


@pytest.mark.torch
def test_the_torch_bridge_takes_a_hub_id(cache):
  import torch  # pylint: disable=import-outside-toplevel
  from jaxsae.bridge import sae as sae_lib  # pylint: disable=import-outside-toplevel

  _, local = cache
  x = np.random.default_rng(2).standard_normal((32, 16)).astype(np.float32)
  t_sae = sae_lib.load(f'hf://{REPO_ID}/ef4')
  assert t_sae.source == f'hf://{REPO_ID}/ef4' and t_sae.group_sizes == (8, 16)
  with torch.no_grad():
    np.testing.assert_allclose(
        t_sae.encode(torch.from_numpy(x)).numpy(), _codes(local['ef4'], x), rtol=1e-5, atol=1e-5
    )
