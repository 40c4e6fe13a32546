"""Fixtures and markers; the builders the tests share are in helpers.py."""

import pytest

from helpers import REPO


@pytest.fixture
def repo():
  return REPO
