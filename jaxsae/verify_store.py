"""python -m jaxsae.verify_store PATH [--quick]

Checks a whole activation store: its commit record, every commit's study records, that every shard
file is there and the arrays hold every committed row, and (unless --quick) every study's rows and
token rows re-read (each chunk's crc32c checked on the way, where the store has them) and compared
with the crc32 recorded when they were written. Prints one `problem:` line per damaged file or
study, naming the studies it holds, then a summary with how to rebuild them. Exits 0 if the store is
sound, 1 if anything is damaged, 2 if PATH is not a store at all.
"""

from __future__ import annotations

import bisect
import dataclasses
import sys

from absl import app, flags
import tensorstore as ts

from jaxsae.errors import ConfigError
from jaxsae.formats import store

_QUICK = flags.DEFINE_boolean(
    'quick', False, 'Check the records and that every shard file exists; do not re-read the rows.'
)


@dataclasses.dataclass
class Report:
  """What `verify` found: counts for the summary, the problems, and the studies they damage."""

  path: str
  rows: int = 0
  studies: int = 0
  commits: int = 0
  shards: dict[str, int] = dataclasses.field(default_factory=dict)
  chunk_checksums: dict[str, bool] = dataclasses.field(default_factory=dict)
  with_checksums: int = 0  # exported studies that recorded the crc32 of their rows
  verified: int = 0  # ... whose rows and tokens were re-read and matched it
  problems: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)  # not damage: an unfinished part
  bad: dict[str, None] = dataclasses.field(default_factory=dict)  # damaged study ids, in order

  @property
  def ok(self) -> bool:
    return not self.problems


class _Studies:
  """The exported studies (with rows) in row order, for finding those that hold given rows."""

  def __init__(self, records: list[dict]):
    self.records = [r for r in records if not r.get('skipped') and r.get('rows')]
    self.starts = [int(r['row_start']) for r in self.records]

  def overlapping(self, lo: int, hi: int) -> range:
    """Indices of the studies with rows in [lo, hi)."""
    first = max(0, bisect.bisect_right(self.starts, lo) - 1)
    last = bisect.bisect_left(self.starts, hi)
    while first < last and self.starts[first] + self.records[first]['rows'] <= lo:
      first += 1
    return range(first, last)


def _problem(report: Report, studies: _Studies, text: str, ranges: list[tuple[int, int]]) -> None:
  """Record a problem with the rows it damages, named by the studies that hold them."""
  hit = sorted({i for lo, hi in ranges for i in studies.overlapping(lo, hi)})
  for i in hit:
    report.bad[str(studies.records[i]['study_id'])] = None
  held = store.describe_studies([studies.records[i] for i in hit], ranges) if ranges else ''
  report.problems.append(text + (f': {held}' if held else ''))


def _check_records(report: Report, records: list[dict]) -> None:
  if len(records) != report.studies:
    report.problems.append(
        f'{store.where(report.path, store.COMMIT)} counts {report.studies} studies but the '
        f'study records list {len(records)}'
    )
  offset = 0
  for r in records:
    if r.get('skipped'):
      continue
    if int(r['row_start']) != offset:
      report.bad[str(r['study_id'])] = None
      report.problems.append(
          f'study {r["study_id"]} starts at row {r["row_start"]}, but the studies before it end at '
          f'row {offset}: its study record is wrong'
      )
    offset = int(r['row_start']) + int(r['rows'])
  if offset != report.rows:
    report.problems.append(
        f'{store.where(report.path, store.COMMIT)} commits {report.rows} rows but the study '
        f'records end at row {offset}'
    )


def _row_ranges(bad_rows: list[int], step: int) -> list[tuple[int, int]]:
  """Merged [lo, hi) ranges of the chunks starting at `bad_rows` (sorted), each `step` rows."""
  out: list[tuple[int, int]] = []
  for lo in bad_rows:
    if out and out[-1][1] == lo:
      out[-1] = (out[-1][0], lo + step)
    else:
      out.append((lo, lo + step))
  return out


def _read_by_chunk(arr: ts.TensorStore, lo: int, hi: int, feed) -> list[tuple[int, int]]:
  """Reads [lo, hi) chunk by chunk, feeding the readable ones; returns the unreadable rows."""
  step = int(arr.chunk_layout.read_chunk.shape[0])
  bad = []
  for a in range(lo, hi, step):
    b = min(a + step, hi)
    try:
      feed(a, b, arr[a:b].read().result())
    except ValueError:
      bad.append(a)
  return [(a, min(b, hi)) for a, b in _row_ranges(bad, step)]


def _span(ranges: list[tuple[int, int]]) -> str:
  return ', '.join(f'{a}-{b - 1}' for a, b in ranges[:4]) + (' ...' if len(ranges) > 4 else '')


def _check_array(
    report: Report, studies: _Studies, kv: ts.KvStore, name: str, quick: bool
) -> dict[int, int] | None:
  """Checks array `name`: its length, its shard files, and (unless quick) every committed row;
  returns the crc32 of each study's rows read (None if the array cannot be opened)."""
  path = report.path
  try:
    arr = store.open_array(path, name, None)
  except ConfigError as e:
    _problem(report, studies, str(e), [(0, report.rows)])
    return None
  lenient = None
  report.chunk_checksums[name] = store.has_chunk_checksums(arr)
  held = min(report.rows, arr.shape[0])
  if arr.shape[0] < report.rows:
    _problem(
        report,
        studies,
        f'{store.where(path, store.COMMIT)} commits {report.rows} rows but the {name} array '
        f'holds {arr.shape[0]}: rows {arr.shape[0]}-{report.rows - 1} are beyond it',
        [(arr.shape[0], report.rows)],
    )
  S = store.shard_rows(arr)
  n_shards = -(-held // S)
  report.shards[name] = n_shards
  prefix = f'{name}/'.encode()
  present = set(kv.list(ts.KvStore.KeyRange(prefix, prefix[:-1] + b'0')).result())
  crc: dict[int, int] = {}

  def feed(lo: int, hi: int, block) -> None:  # rows [lo, hi) into the checksums of their studies
    for i in studies.overlapping(lo, hi):
      r = studies.records[i]
      a, b = max(lo, r['row_start']), min(hi, r['row_start'] + r['rows'])
      crc[i] = store.checksum(block[a - lo : b - lo], crc.get(i, 0))

  for s in range(n_shards):
    lo, hi = s * S, min((s + 1) * S, held)
    key = store.shard_key(arr, name, s)
    if key.encode() not in present:
      _problem(
          report, studies, f'{store.where(path, key)} (rows {lo}-{hi - 1}) is missing', [(lo, hi)]
      )
      continue
    if quick:
      continue
    try:
      block = arr[lo:hi].read().result()
    except ValueError as e:
      if store.has_chunk_checksums(arr) or not str(e).startswith('NOT_FOUND'):
        ranges = _read_by_chunk(arr, lo, hi, feed) or [(lo, hi)]
        _problem(
            report,
            studies,
            f'{store.where(path, key)} (rows {lo}-{hi - 1}) {store.shard_problem(e)}; rows '
            f'{_span(ranges)} cannot be read',
            ranges,
        )
        continue
      lenient = lenient or store.open_array(path, name, None, strict=False)
      block = lenient[lo:hi].read().result()  # an older writer left all-zero chunks out
    feed(lo, hi, block)
  return crc


def _compare(report: Report, studies: _Studies, crcs: dict[str, dict[int, int] | None]) -> None:
  """Each study's rows and tokens against the checksums recorded when they were written."""
  for i, r in enumerate(studies.records):
    recorded = r.get('checksums')
    if not recorded:
      continue
    report.with_checksums += 1
    if str(r['study_id']) in report.bad:
      continue  # already reported: a file it lives in is damaged
    wrong = [
        name
        for name, key in (('activations', 'rows'), ('tokens', 'tokens'))
        if crcs[name] is not None and f'crc32:{crcs[name].get(i, 0):08x}' != recorded.get(key)
    ]
    if wrong:
      lo, hi = int(r['row_start']), int(r['row_start']) + int(r['rows'])
      _problem(
          report,
          studies,
          f'the {" and ".join(wrong)} of rows {lo}-{hi - 1} differ from what was written (their '
          'checksum recorded at export does not match): the data was altered',
          [(lo, hi)],
      )
    else:
      report.verified += 1


def verify(path: str, quick: bool = False) -> Report:
  """Checks the store at `path` (see the module docstring); ConfigError if it is not a store."""
  if not store.exists(path):
    raise ConfigError(f'no activation store at {path!r}: it does not exist.')
  meta = store.check_path(path)  # a store without store.json is described and refused here
  if meta is None:
    raise ConfigError(f'{path!r} is not an activation store: it is empty.')
  if store.is_parts(meta):
    return _verify_parts(path, meta, quick)
  report = Report(path, int(meta['rows']), int(meta['studies']), int(meta['commits']))
  if not report.commits:  # claimed by an export that has not committed yet: nothing to check
    return report
  kv = store.kvstore(path)
  try:
    records = store.read_records(kv, path, report.commits)
    _check_records(report, records)
  except ConfigError as e:  # rows are still checked; their studies cannot be named
    report.problems.append(str(e))
    records = []
  studies = _Studies(records)
  crcs = {name: _check_array(report, studies, kv, name, quick) for name in store.ARRAYS}
  if not quick:
    _compare(report, studies, crcs)
  else:
    report.with_checksums = sum(1 for r in studies.records if r.get('checksums'))
  return report


def _verify_parts(path: str, root: dict, quick: bool) -> Report:
  """A store written by several processes: each part checked as a store, the findings summed and
  each problem prefixed with its part."""
  report = Report(path)
  count = int(root['processes'])
  for i in range(count):
    part = store.part_path(path, i, count)
    lo, hi = root['shares'][i]
    if not store.exists(part) or store.check_path(part) is None:
      report.notes.append(
          f'part {i} ({store.where(path, store.part_key(i, count))}, manifest rows {lo}-{hi - 1}) '
          'has no committed study: its process has not run or was stopped before its first commit '
          '(rerun it with the same config to continue)'
      )
      continue
    r = verify(part, quick)
    report.rows, report.studies, report.commits = (
        report.rows + r.rows,
        report.studies + r.studies,
        report.commits + r.commits,
    )
    for name, n in r.shards.items():
      report.shards[name] = report.shards.get(name, 0) + n
    for name, on in r.chunk_checksums.items():
      report.chunk_checksums[name] = report.chunk_checksums.get(name, True) and on
    report.with_checksums += r.with_checksums
    report.verified += r.verified
    report.problems += [f'part {i}: {p}' for p in r.problems]
    report.bad.update(r.bad)
    if r.studies < hi - lo:
      report.notes.append(
          f'part {i} has {r.studies} of its {hi - lo} studies (manifest rows {lo}-{hi - 1}): its '
          'export has not finished (rerun it with the same config to continue)'
      )
  return report


def summary(report: Report, quick: bool) -> list[str]:
  """The closing lines: what was checked, and what to do about what is damaged."""
  shards = ', '.join(f'{n} {name} shards' for name, n in report.shards.items())
  codec = ', '.join(
      f'{name} {"crc32c" if on else "none (written before jaxsae added them)"}'
      for name, on in report.chunk_checksums.items()
  )
  lines = [
      f'store {report.path}: {report.rows} rows, {report.studies} studies in {report.commits} '
      'commits' + (f', {shards}; chunk checksums: {codec}' if shards else '')
  ]
  if not report.commits:
    lines.append(
        'no study committed yet: its export is running, or was stopped before its first commit'
    )
  elif quick:
    lines.append(
        f'quick check: records and shard files only; rows not re-read ({report.with_checksums} '
        'studies have recorded checksums)'
    )
  elif report.with_checksums:
    lines.append(
        f'study checksums: {report.verified} of {report.with_checksums} studies with recorded '
        'checksums re-read and matched'
    )
  else:
    lines.append(
        'study checksums: none recorded (the store was written before jaxsae recorded them): '
        'rows were re-read but cannot be compared with what was written'
    )
  if report.ok:
    lines.append('OK: no problem found')
    return lines
  bad = list(report.bad)
  shown = ', '.join(bad[:20]) + (f' and {len(bad) - 20} more' if len(bad) > 20 else '')
  lines.append(
      f'DAMAGED: {len(report.problems)} problem(s)'
      + (f'; {len(bad)} damaged studies: {shown}' if bad else '')
  )
  lines.append(store.how_to_rebuild(report.path, verify=False))
  return lines


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError('usage: python -m jaxsae.verify_store PATH [--quick]')
  try:
    report = verify(argv[1], _QUICK.value)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  for p in report.problems:
    print(f'problem: {p}')
  for n in report.notes:
    print(f'incomplete: {n}')
  print('\n'.join(summary(report, _QUICK.value)))
  sys.exit(0 if report.ok else 1)


if __name__ == '__main__':
  app.run(main)
