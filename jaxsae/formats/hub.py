"""SAE weights on the Hugging Face Hub: `hf://ORG/NAME[/SUBFOLDER...][@REVISION]` to a local folder.

Released SAEs (the paper's are `microsoft/maira-2-sae`, expansion factors 2, 4 and 8) are model
repositories holding, in a subfolder or at the top, what `jaxsae.formats.weights` reads; every
command that takes a weights folder also takes such an id. It is fetched with
`huggingface_hub.snapshot_download` into the normal Hugging Face cache, only the files directly in
the subfolder (a dictionary_learning run folder may hold gigabytes of intermediate checkpoints
below it), at the pinned revision when one is given. The cache folder and offline mode are read from the environment at each call
(HF_HUB_CACHE, HF_HOME; HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE), not when huggingface_hub was first
imported: offline, a cached snapshot resolves and a missing one is a ConfigError saying how to
fetch it. Every failure (a gated, private or absent repo, a missing revision or subfolder, no
network) is a ConfigError naming the id and the fix, never a traceback.

Nothing here imports JAX or torch, and huggingface_hub only when an id is resolved.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re

from jaxsae.errors import ConfigError

__all__ = ['PREFIX', 'SPEC_PATTERN', 'HubRef', 'Location', 'is_hub', 'parse', 'locate', 'resolve']

log = logging.getLogger(__name__)

PREFIX = 'hf://'
_PART = r'[A-Za-z0-9][A-Za-z0-9._-]*'
# What config.RULES accepts for a weights path: '' (none), a hub id, or any other (local) path.
SPEC_PATTERN = rf'|{PREFIX}{_PART}/{_PART}(/[^@/\s]+)*/?(@\S+)?|(?!hf:).+'
# The weights files of either layout (dictionary_learning's torch ae.pt too): what marks an SAE
# folder when a missing subfolder's neighbours are listed.
_WEIGHT_FILES = ('ae.safetensors', 'ae.pt', 'sae_weights.safetensors')
_HOW = 'Write it as hf://ORG/NAME[/SUBFOLDER...][@REVISION].'


@dataclasses.dataclass(frozen=True)
class HubRef:
  """One SAE on the Hub: a model repository, a folder in it ('' = its root), a revision."""

  repo_id: str
  subfolder: str = ''
  revision: str | None = None

  def __str__(self) -> str:
    sub = f'/{self.subfolder}' if self.subfolder else ''
    return f'{PREFIX}{self.repo_id}{sub}' + (f'@{self.revision}' if self.revision else '')


@dataclasses.dataclass(frozen=True)
class Location:
  """Where weights given as `spec` are on this machine, and for Hub ids the commit they are."""

  spec: str
  dir: str
  commit: str | None = None


def is_hub(path: str) -> bool:
  return isinstance(path, str) and path.startswith(PREFIX)


def parse(spec: str) -> HubRef:
  """The HubRef of `spec` (`hf://ORG/NAME[/SUBFOLDER...][@REVISION]`), or a ConfigError."""
  if not is_hub(spec):
    raise ConfigError(f'{spec!r} is not a Hugging Face Hub id. {_HOW}')
  rest, revision = spec[len(PREFIX) :], None
  if '@' in rest:
    rest, revision = rest.rsplit('@', 1)
    if not revision or '@' in rest:
      raise ConfigError(
          f'{spec!r}: the revision after "@" is {"empty" if not revision else "ambiguous"}; '
          f'give one branch, tag or commit at the end. {_HOW}'
      )
  parts = rest.strip('/').split('/')
  if len(parts) < 2 or any(p in ('', '.', '..') for p in parts):
    raise ConfigError(f'{spec!r} does not name a repository (ORG/NAME). {_HOW}')
  for p in parts[:2]:
    if not re.fullmatch(_PART, p):
      raise ConfigError(f'{spec!r}: {p!r} is not a valid Hub user or repository name. {_HOW}')
  return HubRef('/'.join(parts[:2]), '/'.join(parts[2:]), revision)


def resolve(path: str) -> str:
  """A local folder for `path`: itself, or a Hub id's folder in the Hugging Face cache."""
  return locate(path).dir if is_hub(path) else path


def locate(path: str) -> Location:
  """`resolve`, with the commit a Hub id resolved to (for provenance records)."""
  if not is_hub(path):
    return Location(path, path)
  ref = parse(path)
  snapshot = _download(ref, path)
  commit = os.path.basename(os.path.normpath(snapshot))
  folder = os.path.join(snapshot, *ref.subfolder.split('/')) if ref.subfolder else snapshot
  if not os.path.isdir(folder):
    raise ConfigError(_missing_folder(ref, path, snapshot, commit, _cache_dir()))
  log.info('%s is %s (commit %s)', path, folder, commit)
  return Location(path, folder, commit)


def _download(ref: HubRef, spec: str) -> str:
  """The snapshot folder holding `ref`'s files, fetched if needed and allowed."""
  import huggingface_hub  # pylint: disable=import-outside-toplevel (only when an id is used)
  from huggingface_hub import utils as hf_utils  # pylint: disable=import-outside-toplevel

  cache, offline = _cache_dir(), _offline()
  sub = glob.escape(ref.subfolder) + '/' if ref.subfolder else ''
  try:
    return huggingface_hub.snapshot_download(
        ref.repo_id,
        repo_type='model',
        revision=ref.revision,
        cache_dir=cache,
        local_files_only=offline,
        allow_patterns=[f'{sub}*'],
        ignore_patterns=[f'{sub}*/*'],  # the folder's own files, not its subfolders'
    )
  except hf_utils.GatedRepoError:
    raise ConfigError(
        f'{spec}: {ref.repo_id} is gated and this machine has no access to it. Accept its terms '
        f'on https://huggingface.co/{ref.repo_id} with your account, then log in here with '
        '`hf auth login` (or set HF_TOKEN).'
    ) from None
  except hf_utils.RepositoryNotFoundError:
    raise ConfigError(
        f'{spec}: there is no model repository {ref.repo_id} on the Hub, or it is private and '
        'this machine is not logged in with access. Check the name; for a private repository log '
        'in with `hf auth login` (or set HF_TOKEN).'
    ) from None
  except hf_utils.RevisionNotFoundError:
    raise ConfigError(
        f'{spec}: {ref.repo_id} has no revision {ref.revision!r}. Give a branch, tag or commit '
        'it has after "@", or drop "@..." for its main branch.'
    ) from None
  except hf_utils.LocalEntryNotFoundError as e:  # offline, or the Hub out of reach
    raise ConfigError(_not_cached(ref, spec, cache, offline, e)) from None
  except hf_utils.HfHubHTTPError as e:
    status = getattr(getattr(e, 'response', None), 'status_code', None)
    why = (
        'is not authorised (log in with `hf auth login`, or set HF_TOKEN)'
        if status in (401, 403)
        else 'failed'
    )
    raise ConfigError(f'{spec}: the download from the Hub {why}: {_first_line(e)}') from None
  except hf_utils.HFValidationError as e:
    raise ConfigError(f'{spec}: not a valid Hub repository id ({_first_line(e)}). {_HOW}') from None
  except OSError as e:  # a full disk, an unwritable cache
    raise ConfigError(
        f'{spec}: cannot download into the Hugging Face cache at {cache}: {e}. Free some space, '
        'or point HF_HUB_CACHE at a writable folder with room.'
    ) from None


def _cache_dir() -> str:
  """The hub cache folder as huggingface_hub would choose it now, from today's environment."""
  for var in ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE'):
    if os.environ.get(var):
      return os.path.expanduser(os.path.expandvars(os.environ[var]))
  if os.environ.get('HF_HOME'):
    return os.path.join(os.path.expanduser(os.path.expandvars(os.environ['HF_HOME'])), 'hub')
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel

  return constants.HF_HUB_CACHE


def _offline() -> bool:
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel

  flags = (os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TRANSFORMERS_OFFLINE'))
  return constants.HF_HUB_OFFLINE or any(
      (v or '').strip().upper() in ('1', 'ON', 'YES', 'TRUE') for v in flags
  )


def _fetch_command(ref: HubRef) -> str:
  sub = f" --include '{ref.subfolder}/*'" if ref.subfolder else ''
  rev = f' --revision {ref.revision}' if ref.revision else ''
  return f'hf download {ref.repo_id}{sub}{rev}'


def _not_cached(ref: HubRef, spec: str, cache: str, offline: bool, error: Exception) -> str:
  what = f'{ref.repo_id}' + (f' (folder {ref.subfolder})' if ref.subfolder else '')
  what += f' at revision {ref.revision}' if ref.revision else ''
  fetch = f'`{_fetch_command(ref)}` with network access and the same HF_HUB_CACHE'
  if getattr(error, 'snapshot_path', None):  # huggingface_hub knows files are missing
    return (
        f'{spec}: the cached copy of {what} in {cache} is incomplete ({_first_line(error)}). '
        f'Complete it with {fetch}.'
    )
  if offline:
    return (
        f'{spec}: {what} is not in the Hugging Face cache at {cache}, and offline mode '
        f'(HF_HUB_OFFLINE) forbids downloading it. Fetch it once with {fetch}, or unset '
        'HF_HUB_OFFLINE.'
    )
  return (
      f'{spec}: the Hub cannot be reached ({_first_line(error)}) and {what} is not in the '
      f'Hugging Face cache at {cache}. Check the network, or fetch it on a machine that has one '
      f'with {fetch} and copy the cache here.'
  )


def _missing_folder(ref: HubRef, spec: str, snapshot: str, commit: str, cache: str) -> str:
  found = _sae_folders(snapshot) or _listed_sae_folders(ref, commit, cache)
  there = f'SAE folders: {", ".join(found)}' if found else 'no SAE folder of it is here'
  if _offline():
    return (
        f'{spec}: the cached copy of {ref.repo_id} (commit {commit}) in {cache} has no folder '
        f'{ref.subfolder!r} ({there}), and offline mode (HF_HUB_OFFLINE) forbids downloading it. '
        f'If the repository has it, fetch it once with `{_fetch_command(ref)}` with network '
        'access and the same HF_HUB_CACHE, or unset HF_HUB_OFFLINE.'
    )
  return (
      f'{spec}: {ref.repo_id} at commit {commit} has no folder {ref.subfolder!r} ({there}). '
      f'Check the folder name on https://huggingface.co/{ref.repo_id}/tree/{commit}.'
  )


def _sae_folders(snapshot: str) -> list[str]:
  """The folders of a snapshot on disk that hold SAE weights, relative to it ('.' = the root)."""
  out = []
  for root, _, files in os.walk(snapshot):
    if any(f in _WEIGHT_FILES for f in files):
      out.append(os.path.relpath(root, snapshot).replace(os.sep, '/'))
  return sorted(out)


def _listed_sae_folders(ref: HubRef, commit: str, cache: str) -> list[str]:
  """The same from the repository's file listing that huggingface_hub caches when online (newer
  versions only); [] when there is none."""
  try:
    from huggingface_hub import get_cached_repo_tree  # pylint: disable=import-outside-toplevel

    paths = [f.path for f in get_cached_repo_tree(ref.repo_id, revision=commit, cache_dir=cache)]
  except Exception:  # pylint: disable=broad-except  (an older huggingface_hub, or no listing)
    return []
  return sorted(
      {p.rpartition('/')[0] or '.' for p in paths if p.rpartition('/')[2] in _WEIGHT_FILES}
  )


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
