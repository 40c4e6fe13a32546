"""Fixtures, markers and the fault-injection tally; the builders the tests share are in helpers.py."""

import collections

import pytest

from helpers import REPO

# kind of fault -> [injected, survived]: filled by the `faults` fixture, printed at the end.
_FAULTS = collections.defaultdict(lambda: [0, 0])


@pytest.fixture
def repo():
  return REPO


class FaultLog:
  """What a fault-injection test did to the system: `inject(kind, n)` after the faults happened.
  A fault survived when the test's checks that nothing was lost or corrupted then pass."""

  def __init__(self):
    self.counts = collections.Counter()

  def inject(self, kind: str, n: int = 1) -> None:
    self.counts[kind] += int(n)


def pytest_collection_modifyitems(items):
  """A test that takes the `faults` fixture is in the fault-injection suite (`pytest -m fault`)."""
  for item in items:
    if 'faults' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.fault)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if report.when == 'call':
    item.faults_passed = report.passed


@pytest.fixture
def faults(request):
  """Count the faults a test injects (`pytest -m fault` runs the fault-injection suite)."""
  log = FaultLog()
  yield log
  passed = getattr(request.node, 'faults_passed', False)
  for kind, n in log.counts.items():
    _FAULTS[kind][0] += n
    _FAULTS[kind][1] += n if passed else 0


def pytest_terminal_summary(terminalreporter):
  if not _FAULTS:
    return
  injected = sum(v[0] for v in _FAULTS.values())
  survived = sum(v[1] for v in _FAULTS.values())
  terminalreporter.section('fault injection')
  for kind, (n, ok) in sorted(_FAULTS.items()):
    terminalreporter.write_line(f'{kind}: injected {n}, survived {ok}')
  terminalreporter.write_line(
      f'faults injected {injected}, survived {survived}, data lost {injected - survived}'
  )
