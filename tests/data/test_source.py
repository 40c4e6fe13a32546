"""The ActivationSource protocol: every member declared, the optional ones None-able, both sources
defining all of them, and the callers reading them with `is None` (no probing)."""

import inspect

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config, write_store
from jaxsae import data
from jaxsae.data import source as source_lib
from jaxsae.data import store_source, synthetic
from jaxsae.formats import store

MEMBERS = (
    'd',
    'batch_size',
    'scale',
    'features',
    'held_out_rows',
    'held_out_note',
    'batch',
    'held_out',
    'iterator',
)


def test_the_protocol_declares_every_member_the_callers_read():
  declared = set(data.ActivationSource.__annotations__) | {
      n
      for n, v in vars(data.ActivationSource).items()
      if inspect.isfunction(v) and not n.startswith('_')
  }
  assert declared == set(MEMBERS)
  code = inspect.getsource(source_lib)
  assert 'hasattr(' not in code and 'getattr(' not in code


@pytest.fixture
def both(tmp_path):
  write_store(tmp_path / 's', [100] * 3)
  return (
      synthetic.SyntheticSource.from_config(tiny_config()),
      store_source.StoreSource(store.open_store(str(tmp_path / 's')), 64, seed=0),
  )


def test_both_sources_define_every_member(both):
  syn, sto = both
  for src in both:
    assert all(n in vars(src) or n in vars(type(src)) for n in MEMBERS), type(src)
  assert syn.scale is None and syn.iterator() is None and syn.features.shape == (32, 16)
  assert sto.scale > 0 and sto.features is None
  assert syn.held_out_rows is None and sto.held_out_rows == 0  # fraction 0: nothing held out
  assert 'held_out_fraction=0' in sto.held_out_note and list(sto.held_out(100)) == []
  it = sto.iterator()
  assert it is not None
  it.close()


def test_batches_and_scale_follow_the_declared_members(both):
  syn, sto = both
  it = data.batches(syn)  # the plain in-order pipeline: batch i at position i
  np.testing.assert_array_equal(next(it), syn.batch(0))
  np.testing.assert_array_equal(next(it), syn.batch(1))
  assert it.get_state() is not None
  assert data.activation_scale(sto, 2) == sto.scale  # the store's own, not measured
  mean_sq = np.mean([float(jnp.mean(jnp.sum(syn.batch(i) ** 2, -1))) for i in range(2)])
  assert data.activation_scale(syn, 2) == pytest.approx((mean_sq / syn.d) ** 0.5, rel=1e-5)
