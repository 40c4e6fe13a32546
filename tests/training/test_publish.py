"""`python -m jaxsae.export_weights --push_to_hub=...`: a tiny trained run published for real
through huggingface_hub, its two network calls (create_repo, upload_folder) stood in for by
recorders in the child process; the dry run; the errors that stop a push before any work."""

import json
import os
import re
import sys

import pytest

from helpers import card_parts, card_row, cli_args, run_cli
from jaxsae import weights

TOKEN = 'hf_TESTtokenNEVERshownXYZ0123456789'

# Runs the real command with huggingface_hub's network calls replaced by recorders.
RECORDING = """
import json, os, runpy, sys, types
import huggingface_hub

calls = []


def record(call):
  calls.append(call)
  with open(os.environ['RECORD'], 'w') as f:
    json.dump(calls, f)


def create_repo(self, repo_id, **kw):
  record({'call': 'create_repo', 'repo_id': repo_id, 'kw': kw,
          'token_given': self.token == os.environ.get('HF_TOKEN')})
  return types.SimpleNamespace(repo_id=repo_id)


def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, **kw):
  files = {n: open(os.path.join(folder_path, n), 'rb').read().decode('utf-8', 'replace')
           for n in sorted(os.listdir(folder_path))}
  record({'call': 'upload_folder', 'repo_id': repo_id, 'path_in_repo': path_in_repo,
          'files': files, 'kw': kw, 'token_given': self.token == os.environ.get('HF_TOKEN')})
  return types.SimpleNamespace(commit_url='https://huggingface.co/org/name/commit/0123abcd')


huggingface_hub.HfApi.create_repo = create_repo
huggingface_hub.HfApi.upload_folder = upload_folder
sys.argv = ['export_weights', *sys.argv[1:]]
runpy.run_module('jaxsae.export_weights', run_name='__main__')
"""


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A finished tiny synthetic run (checkpoints and summary.json)."""
  workdir = tmp_path_factory.mktemp('publish') / 'run'
  r = run_cli(cli_args('jaxsae.train', workdir=str(workdir)))
  assert r.returncode == 0, r.stderr[-3000:]
  return str(workdir)


@pytest.fixture
def no_token(monkeypatch, tmp_path):
  """No token anywhere: neither HF_TOKEN nor a saved login (an empty HF_HOME)."""
  monkeypatch.delenv('HF_TOKEN', raising=False)
  monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))


def export(*flags, env=None):
  return run_cli([sys.executable, '-m', 'jaxsae.export_weights', *flags], env_extra=env)


@pytest.mark.slow
def test_dry_run_writes_the_folder_that_would_be_uploaded(run, tmp_path, no_token):
  out = tmp_path / 'out'
  r = export(f'--workdir={run}', f'--out={out}', '--push_to_hub=org/name/sub', '--dry_run',
             env={'HF_HUB_OFFLINE': '1'})  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['README.md', 'ae.pt', 'ae.safetensors', 'config.json',
                                     'manifest.json']  # fmt: skip
  assert 'https://huggingface.co/org/name' in r.stdout and 'sub/README.md' in r.stdout
  assert 'dry run: nothing was sent' in r.stdout and 'no Hugging Face token' in r.stdout
  meta, body = card_parts((out / 'README.md').read_text())
  assert meta['library_name'] == 'jaxsae' and meta['license'] == 'other'
  assert 'base_model' not in meta and {'sparse-autoencoder', 'synthetic'} <= set(meta['tags'])
  summary = json.load(open(os.path.join(run, 'summary.json')))
  assert float(card_row(body, 'FVU (fraction of variance unexplained)')) == float(
      '%.4g' % summary['eval_fvu']
  )
  assert float(card_row(body, 'L0 (active latents per token)')) == float(
      '%.4g' % summary['eval_l0']
  )
  assert card_row(body, 'dead latents').startswith(
      f'{summary["dead_latents"]} of 64 ({100 * summary["dead_fraction"]:.4g} %), no firing on '
      f'{summary["dead_over_tokens"]:,} tokens'
  )
  assert f'on {summary["eval_tokens"]:,} held-out tokens' in body
  assert 'Not measured: no evaluation.json was given' in body
  assert card_row(body, 'training tokens').startswith(f'{40 * 64:,} ')
  assert (
      f'python -m jaxsae.export_weights --workdir={run} --out={out} --format=dictionary_learning '
      '--step=40 --push_to_hub=org/name/sub\n'
  ) in body
  manifest = json.loads((out / 'manifest.json').read_text())
  assert 'README.md' in manifest['files']
  sae, cfg = weights.load(str(out))  # the manifest, card included, verifies
  assert (sae.d, sae.F, cfg['trainer']['steps']) == (16, 64, 40)
  # Again into the same folder: the previous export, card included, is replaced.
  r = export(f'--workdir={run}', f'--out={out}', '--push_to_hub=org/name/sub', '--dry_run',
             '--format=saelens', '--license=mit')  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'sae_weights.safetensors' in os.listdir(out) and 'ae.pt' not in os.listdir(out)
  assert card_parts((out / 'README.md').read_text())[0]['license'] == 'mit'


@pytest.mark.slow
def test_push_uploads_the_folder_with_the_token_and_never_shows_it(run, tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
  script, record, out = tmp_path / 'push.py', tmp_path / 'calls.json', tmp_path / 'out'
  script.write_text(RECORDING)
  evaluation = tmp_path / 'evaluation.json'
  evaluation.write_text(json.dumps({
      'loss_recovered': 0.875, 'ce_clean': 1.0, 'ce_splice': 1.25, 'ce_zero': 3.0,
      'kl_splice': 0.5, 'kl_zero': 2.0, 'group_sizes': [4, 4, 8, 16, 32], 'held_out': True,
  }))  # fmt: skip
  args = [f'--workdir={run}', f'--out={out}', '--push_to_hub=hf://org/name/layer_2/ef4',
          f'--evaluation={evaluation}', '--license=apache-2.0', '--private']  # fmt: skip
  r = run_cli([sys.executable, str(script), *args], {'HF_TOKEN': TOKEN, 'RECORD': str(record)})
  assert r.returncode == 0, r.stderr[-3000:]
  assert TOKEN not in r.stdout + r.stderr
  create, upload = json.loads(record.read_text())
  assert create['call'] == 'create_repo' and create['repo_id'] == 'org/name'
  assert create['kw']['private'] is True and create['kw']['exist_ok'] is True
  assert upload['repo_id'] == 'org/name' and upload['path_in_repo'] == 'layer_2/ef4'
  assert create['token_given'] and upload['token_given']
  assert {'ae.pt', 'cfg.json', 'README.md', 'manifest.json'} <= set(upload['kw']['delete_patterns'])
  assert sorted(upload['files']) == sorted(os.listdir(out))
  assert sorted(upload['files']) == ['README.md', 'ae.pt', 'ae.safetensors', 'config.json',
                                     'manifest.json']  # fmt: skip
  assert not any(TOKEN in text for text in upload['files'].values())
  meta, body = card_parts(upload['files']['README.md'])
  assert meta['license'] == 'apache-2.0'
  assert float(card_row(body, 'loss recovered')) == 0.875
  assert card_row(body, 'KL(clean ‖ spliced)') == '0.5'
  assert "weights.load('hf://org/name/layer_2/ef4')" in body
  assert (
      'uploaded' in r.stdout
      and 'commit: https://huggingface.co/org/name/commit/0123abcd' in r.stdout
  )


@pytest.mark.slow
def test_errors_stop_the_push_before_any_work(run, tmp_path, no_token):
  out = tmp_path / 'out'
  r = export(f'--workdir={run}', f'--out={out}', '--push_to_hub=org/name/sub')
  assert r.returncode == 2 and not out.exists()
  assert re.search(r'error: no Hugging Face token to push to org/name with: log in with `hf auth '
                   r'login`, or set HF_TOKEN.*--dry_run', r.stderr), r.stderr  # fmt: skip
  r = export(f'--workdir={run}', f'--out={out}', '--push_to_hub=org', '--dry_run')
  assert r.returncode == 2 and not out.exists()
  assert 'error: --push_to_hub=org does not name a repository (ORG/NAME)' in r.stderr
  r = export(f'--workdir={run}', f'--out={out}', '--push_to_hub=org/name', '--dry_run',
             f'--evaluation={tmp_path / "absent.json"}')  # fmt: skip
  assert r.returncode == 2 and not out.exists() and 'no such file' in r.stderr
  r = export(f'--workdir={run}', f'--out={out}', '--license=mit')
  assert r.returncode == 2 and not out.exists()
  assert '--license only apply with --push_to_hub' in r.stderr
  r = export(f'--workdir={run}', f'--out={out}', '--push_to_hub=org/name',
             env={'HF_TOKEN': TOKEN, 'HF_HUB_OFFLINE': '1'})  # fmt: skip
  assert r.returncode == 2 and not out.exists() and 'offline mode is on' in r.stderr
  assert TOKEN not in r.stdout + r.stderr
