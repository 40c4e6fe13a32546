"""One code style, enforced: the tree is as pyink formats it (its settings are in pyproject.toml)."""

import subprocess
import sys

from helpers import REPO


def test_the_code_is_formatted():
  r = subprocess.run(
      [sys.executable, '-m', 'pyink', '--check', '--quiet', '.'],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert r.returncode == 0, (
      'these files are not formatted; run `.venv/bin/pyink .` in the repository root:\n'
      + r.stderr[-3000:]
  )
