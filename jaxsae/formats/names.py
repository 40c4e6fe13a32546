"""Study ids as file names: a reversible encoding that cannot leave its folder.

Study ids come from the manifest and may hold anything: `/` (MIMIC's `p10/p10000/s50410`), `..`,
an absolute path, spaces, unicode. Used raw in a path they crash the writer or put files outside
the output folder. `encode` maps an id to one path component that is safe on POSIX file systems and,
URL-quoted (`%` -> `%25`), in links:

  * bytes of the id's UTF-8 outside `[A-Za-z0-9._-]` become `%XX` (upper-case hex), `%` included;
  * a leading `.` becomes `%2E`, so no name is `.`, `..` or hidden;
  * the empty id becomes `%` (a name no other id encodes to);
  * an encoding longer than `MAX_NAME` characters is cut (never inside a `%XX`) and ends in
    `~` + 16 hex digits of the id's SHA-256: still unique and bounded, but no longer decodable
    (`~` never appears otherwise, so `decode` recognises it).

`decode(encode(s)) == s` for every id that was not cut. Names are case-sensitive like the ids; on a
case-insensitive file system two ids differing only in case would share a file.
"""

from __future__ import annotations

import hashlib
import re

SAFE = frozenset(b'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-')
MAX_NAME = 180  # leaves room for a suffix such as '_0.png' within the usual 255-byte limit
HASHED = '~'
EMPTY = '%'
_VALID = re.compile(r'(?:[A-Za-z0-9._-]|%[0-9A-F]{2})+')


def encode(study_id: str, max_len: int = MAX_NAME) -> str:
  """`study_id` as one safe path component of at most `max_len` characters."""
  if not isinstance(study_id, str):
    raise TypeError(f'study ids are strings; got {type(study_id).__name__} {study_id!r}')
  if max_len < 24:
    raise ValueError(f'max_len={max_len} is too short for a hashed name (needs >= 24)')
  if not study_id:
    return EMPTY
  raw = study_id.encode('utf-8', 'surrogatepass')
  parts = [chr(b) if b in SAFE else f'%{b:02X}' for b in raw]
  if parts[0] == '.':
    parts[0] = '%2E'
  name = ''.join(parts)
  if len(name) <= max_len:
    return name
  digest = hashlib.sha256(raw).hexdigest()[:16]
  keep, size = [], 0
  for p in parts:  # whole pieces only, so a '%XX' is never cut in two
    if size + len(p) > max_len - len(digest) - 1:
      break
    keep.append(p)
    size += len(p)
  return ''.join(keep) + HASHED + digest


def decode(name: str) -> str:
  """The study id `encode` turned into `name`; ValueError for a cut (hashed) or foreign name."""
  if name == EMPTY:
    return ''
  if HASHED in name:
    raise ValueError(
        f'{name!r} is the hashed name of a study id too long to keep; it cannot be decoded '
        '(look the id up in the records that name this file)'
    )
  if not _VALID.fullmatch(name) or name.startswith('.'):
    raise ValueError(f'{name!r} is not a name jaxsae.formats.names.encode writes')
  out, i = bytearray(), 0
  while i < len(name):
    if name[i] == '%':
      out.append(int(name[i + 1 : i + 3], 16))
      i += 3
    else:
      out.append(ord(name[i]))
      i += 1
  try:
    study_id = out.decode('utf-8', 'surrogatepass')
  except UnicodeDecodeError:
    study_id = None
  if study_id is None or encode(study_id, max(len(name), 24)) != name:  # e.g. '%41' for 'A'
    raise ValueError(f'{name!r} is not a name jaxsae.formats.names.encode writes')
  return study_id
