"""Fixtures of the bridge tests."""

import os
import sys

import pytest

from helpers import REPO


@pytest.fixture(scope='session')
def demo(tmp_path_factory):
  """16 demo studies and the tiny model, written once per test session."""
  sys.path.insert(0, os.path.join(REPO, 'tools'))
  import make_demo_data  # pylint: disable=import-outside-toplevel
  from jaxsae.bridge import tiny_model  # pylint: disable=import-outside-toplevel

  out = tmp_path_factory.mktemp('demo')
  rows = make_demo_data.make_studies(str(out), 16)
  tiny_model.build(str(out / 'model'), tiny_model.words(make_demo_data.vocabulary_texts(rows)))
  return out, rows
