"""Interventions on layer L of the tiny LLaVA stand-in: exact edits, clean exits, clear errors."""

import os
import sys

import pytest
import torch

from helpers import LAYER, build_tiny, exact_torch_sae, random_torch_sae
from jaxsae.config import ConfigError

pytestmark = pytest.mark.torch


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(site with a random SAE, processor, one study's prompt inputs)."""
  from jaxsae.bridge import interventions as iv
  from jaxsae.bridge import loading, steering

  c = build_tiny(tmp_path_factory.mktemp('tiny'))
  model, processor = loading.load(c)
  site = iv.Site(model, random_torch_sae(), LAYER, c.model.hook_name)
  study = steering.studies(c.export.manifest, count=1)[0]
  return site, processor, steering.prepare(site, processor, study)


def forward(site, s):
  """(logits, layer output) of one plain forward pass over the prompt."""
  from jaxsae.bridge import interventions as iv

  with iv.record(site) as out, torch.inference_mode():
    logits = site.model(**s.inputs, use_cache=False).logits
  return logits, out[0][0]


def test_add_is_exact_at_chosen_positions_and_nowhere_else(tiny):
  from jaxsae.bridge import interventions as iv

  site, _, s = tiny
  _, clean = forward(site, s)
  T = clean.shape[0]
  image = s.prompt_ids == site.image_token_id
  assert 0 < int(image.sum()) < T
  f, alpha = 5, 3.5
  every, none = torch.ones(T, dtype=torch.bool), torch.zeros(T, dtype=torch.bool)
  listed = torch.isin(torch.arange(T), torch.tensor([3, 7, T - 1]))
  for where, mask in (
      ('all', every),
      ('prompt', every),
      ('image', image),
      ([3, 7, T - 1], listed),
      (listed.numpy(), listed),
      ('generated', none),
  ):
    with iv.add(site, [f], alpha, where, s.prompt_ids):
      _, steered = forward(site, s)
    assert torch.equal(steered[mask], clean[mask] + alpha * site.sae.W_dec[f]), where
    assert torch.equal(steered[~mask], clean[~mask]), where
  # Several features, each with its own alpha; and alpha relative to a residual norm.
  with iv.add(site, [1, 9], [2.0, -1.0], 'all'):
    _, steered = forward(site, s)
  want = (2 * site.sae.W_dec[1] - site.sae.W_dec[9]).expand_as(clean)
  torch.testing.assert_close(steered - clean, want, rtol=0, atol=1e-6)
  v = iv.steering_vector(site, [4], 2.0, norm=0.25)
  torch.testing.assert_close(v.norm(), torch.tensor(0.5))


def test_positions_follow_the_kv_cache_during_generation(tiny):
  """Steering 'generated' positions while decoding token by token edits exactly what one forward
  over the whole sequence (same edit) edits: the hook knows each step's absolute position."""
  from jaxsae.bridge import interventions as iv

  site, _, s = tiny
  P = len(s.prompt_ids)
  with iv.add(site, [5], 2.0, 'generated', s.prompt_ids), iv.record(
      site
  ) as steps, torch.inference_mode():
    seq = site.model.generate(**s.inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
  assert seq.shape[1] == P + 6 and steps[0].shape[1] == P
  assert all(t.shape[1] == 1 for t in steps[1:])
  _, clean_prompt = forward(site, s)
  assert torch.equal(steps[0][0], clean_prompt)  # the prompt pass is untouched
  full = {**s.inputs, 'input_ids': seq, 'attention_mask': torch.ones_like(seq)}
  with iv.add(site, [5], 2.0, 'generated', s.prompt_ids), iv.record(
      site
  ) as out, torch.inference_mode():
    site.model(**full, use_cache=False)
  incremental = torch.cat([t[0] for t in steps])
  torch.testing.assert_close(incremental, out[0][0, :-1], rtol=1e-4, atol=1e-5)
  with iv.record(site) as plain, torch.inference_mode():
    site.model(**full, use_cache=False)
  assert not torch.allclose(plain[0][0, P:], out[0][0, P:])  # generated positions were edited


def test_clamp_to_current_value_leaves_logits_unchanged(tiny):
  from jaxsae.bridge import interventions as iv

  site, _, s = tiny
  logits, x = forward(site, s)
  acts = site.sae.encode(x)
  p = int(s.prompt_ids.ne(site.image_token_id).nonzero()[-1])  # a text token
  f = int(acts[p].argmax())
  value = float(acts[p, f])
  assert value > 0
  with iv.clamp(site, [f], value, [p], s.prompt_ids):
    same, x_same = forward(site, s)
  torch.testing.assert_close(same, logits, rtol=0, atol=1e-5)
  # An inactive feature clamped to 0 everywhere: bit-identical.
  dead = int((acts == 0).all(0).nonzero()[0]) if (acts == 0).all(0).any() else None
  if dead is not None:
    with iv.clamp(site, [dead], 0.0, 'all'):
      assert torch.equal(forward(site, s)[0], logits)
  # Clamping to another value moves x by exactly (v - a) W_dec[f] there, keeping the error term.
  with iv.clamp(site, [f], value + 2.0, [p], s.prompt_ids):
    changed, x_changed = forward(site, s)
  torch.testing.assert_close(x_changed[p] - x[p], 2.0 * site.sae.W_dec[f], rtol=0, atol=1e-5)
  assert torch.equal(x_changed[:p], x[:p]) and not torch.allclose(changed, logits)


def test_splice(tiny):
  from jaxsae.bridge import interventions as iv

  site, _, s = tiny
  logits, x = forward(site, s)
  with iv.splice(site):
    spliced, x_spliced = forward(site, s)
  torch.testing.assert_close(x_spliced, site.sae(x), rtol=0, atol=1e-6)
  assert not torch.allclose(spliced, logits, atol=1e-4)
  with iv.splice(site, keep_error=True):
    torch.testing.assert_close(forward(site, s)[0], logits, rtol=0, atol=1e-5)
  exact = iv.Site(site.model, exact_torch_sae(), LAYER)
  with iv.splice(exact):
    assert torch.equal(forward(exact, s)[0], logits)


def test_every_context_manager_restores_bit_identical_logits(tiny):
  from jaxsae.bridge import interventions as iv

  site, _, s = tiny
  before = forward(site, s)[0]
  params = {n: p.clone() for n, p in site.model.named_parameters()}
  makers = {
      'add': lambda: iv.add(site, [3], 4.0, 'prompt', s.prompt_ids),
      'clamp': lambda: iv.clamp(site, [3], 5.0, 'image', s.prompt_ids),
      'splice': lambda: iv.splice(site),
      'zero_ablate': lambda: iv.zero_ablate(site, [0, 1, 2]),
  }
  for name, make in makers.items():
    with make():
      inside = forward(site, s)[0]
    assert not torch.equal(inside, before), name
    assert torch.equal(forward(site, s)[0], before), name
    with pytest.raises(RuntimeError, match='boom'):  # also when the block raises
      with make():
        raise RuntimeError('boom')
    assert torch.equal(forward(site, s)[0], before), name
  assert not site.module._forward_hooks  # pylint: disable=protected-access
  assert all(torch.equal(p, params[n]) for n, p in site.model.named_parameters())


def test_clear_errors(tiny):
  from jaxsae.bridge import interventions as iv

  site, _, s = tiny
  with pytest.raises(ConfigError, match=r'feature 128 is out of range.*F=128.*0\.\.127'):
    iv.add(site, [1, 128], 1.0)
  with pytest.raises(ConfigError, match=r'feature -1 is out of range'):
    iv.clamp(site, [-1], 1.0)
  with pytest.raises(ConfigError, match=r'SAE has d=32 but .*layers\.2 has width 64'):
    iv.Site(site.model, random_torch_sae(d=32), LAYER)
  with pytest.raises(ConfigError, match=r'model\.layer=7 .* has 4 decoder layers'):
    iv.Site(site.model, site.sae, 7, '')
  with pytest.raises(ConfigError, match=r"hook_name='model\.nothing\.layers\.2' is not a module"):
    iv.Site(site.model, site.sae, LAYER, 'model.nothing.layers.2')
  with pytest.raises(ConfigError, match=r"where='text' is not a position set"):
    iv.add(site, [1], 1.0, 'text')
  with pytest.raises(ConfigError, match=r"where='prompt' needs prompt_ids"):
    iv.add(site, [1], 1.0, 'prompt')
  with pytest.raises(ConfigError, match='2 features but 3 alphas'):
    iv.add(site, [1, 2], [1.0, 2.0, 3.0])
  assert not site.module._forward_hooks  # pylint: disable=protected-access
