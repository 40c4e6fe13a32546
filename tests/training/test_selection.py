"""The fast exact BatchTopK threshold equals a full sort's, on easy and adversarial batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import model, selection


@pytest.mark.parametrize('case', ['random', 'skewed_rows', 'sparse', 'ties'])
def test_threshold_equals_reference(case):
  key = jax.random.PRNGKey(0)
  B, F, k = 64, 256, 8
  pre = jax.nn.relu(jax.random.normal(key, (B, F)))
  if case == 'skewed_rows':  # a few rows hold most of the budget: the candidate proof fails
    pre = pre * jnp.where(jnp.arange(B)[:, None] < 2, 100.0, 1.0)
  if case == 'sparse':  # fewer positive entries than the budget: threshold 0
    pre = jnp.where(jax.random.uniform(key, (B, F)) < 0.01, pre, 0.0)
  if case == 'ties':
    pre = jnp.round(pre * 4) / 4
  ref = selection.reference_threshold(pre, B * k)
  fast = jax.jit(selection.batch_topk_threshold, static_argnums=(1, 2))(pre, k, 2)
  assert float(fast) == float(ref)
  acts = model.batch_topk(pre, k, 2)
  n = int(jnp.sum(acts > 0))
  assert n == min(int(jnp.sum(pre >= ref)), int(jnp.sum(pre > 0)))
  if case in ('random', 'skewed_rows'):
    assert n == B * k


def test_bisection_on_fallback_path_is_exact():
  pre = jnp.asarray(np.random.default_rng(0).exponential(size=(32, 100)).astype(np.float32))
  for budget in (1, 7, 100, 3199):
    assert float(selection.bisect_threshold(pre, budget)) == float(
        selection.reference_threshold(pre, budget)
    )


def test_row_threshold_over_valid_entries():
  key = jax.random.PRNGKey(1)
  pre = jax.nn.relu(jax.random.normal(key, (16, 64)))
  valid = jax.random.uniform(jax.random.PRNGKey(2), (16, 64)) < 0.3
  for k in (1, 5, 40):
    t = selection.row_topk_threshold(pre, valid, k)
    for r in range(16):
      vals = np.sort(np.asarray(pre[r])[np.asarray(valid[r])])[::-1]
      expected = vals[k - 1] if len(vals) >= k else 0.0
      assert float(t[r]) == float(expected)
    np.testing.assert_array_equal(selection._row_bisect(pre, valid, k, lambda n: n), t)
