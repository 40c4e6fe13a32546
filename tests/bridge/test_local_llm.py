"""LocalChat on tiny random models: greedy, only the new tokens, both checkpoint kinds."""

import pytest
import torch
import transformers

from jaxsae.bridge import local_llm, tiny_model
from jaxsae.interpret import explain

pytestmark = pytest.mark.torch

TEXT = 'the patient has a small pleural effusion on the left side with no pneumothorax'
MESSAGES = [
    {'role': 'system', 'content': 'answer briefly'},
    {'role': 'user', 'content': 'the patient has a small effusion'},
]


@pytest.fixture(scope='module')
def llava_dir(tmp_path_factory):
  """The demo's tiny LLaVA (not a causal-LM class; its template wants content parts)."""
  out = tmp_path_factory.mktemp('llava')
  return tiny_model.build(str(out), tiny_model.words([TEXT]), hidden=32, layers=2)


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  """A plain tiny causal LM whose tokenizer has no chat template."""
  out = str(tmp_path_factory.mktemp('llama'))
  tok = tiny_model.make_tokenizer(tiny_model.words([TEXT]) + ['user', 'assistant', 'system', ':'])
  tok.chat_template = None
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=len(tok),
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=4,
      pad_token_id=tok.pad_token_id,
      bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id,
  )
  transformers.LlamaForCausalLM(config).save_pretrained(out)
  tok.save_pretrained(out)
  return out


def greedy(chat, prompt, n):
  """Reference greedy decoding by repeated forward passes: the newly generated ids only."""
  tok = chat.tokenizer
  ids = tok(prompt, return_tensors='pt')['input_ids']
  new = []
  with torch.no_grad():
    for _ in range(n):
      nxt = int(chat.model(input_ids=ids).logits[0, -1].argmax())
      if nxt == tok.eos_token_id:
        break
      new.append(nxt)
      ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
  return tok.decode(new, skip_special_tokens=True).strip()


def test_llava_dir_uses_its_chat_template_and_returns_only_new_tokens(llava_dir):
  chat = local_llm.LocalChat(llava_dir, max_new_tokens=6)
  assert chat.name == f'local:{llava_dir}'
  prompt = local_llm.render_chat(chat.tokenizer, MESSAGES)
  # The Vicuna-style template has no system role: the system text joins the user turn.
  assert prompt == 'USER: answer briefly\n\nthe patient has a small effusion ASSISTANT:'
  out = chat.complete(MESSAGES, max_tokens=100, temperature=0.7)
  assert isinstance(out, str) and out
  assert out == greedy(chat, prompt, 6)
  assert out == chat.complete(MESSAGES, max_tokens=100, temperature=0.7)  # greedy: deterministic


def test_causal_lm_without_template_uses_plain_roles_and_caps_tokens(llama_dir):
  chat = local_llm.LocalChat(llama_dir, max_new_tokens=50)
  assert isinstance(chat.model, transformers.LlamaForCausalLM)
  prompt = local_llm.render_chat(chat.tokenizer, MESSAGES)
  assert prompt == ('system: answer briefly\nuser: the patient has a small effusion\nassistant:')
  out = chat.complete(MESSAGES, max_tokens=3, temperature=0.0)
  assert out and out == greedy(chat, prompt, 3)
  assert len(chat.tokenizer(out, add_special_tokens=False)['input_ids']) <= 3


def test_local_chat_drives_explain_feature(llava_dir):
  chat = local_llm.LocalChat(llava_dir, max_new_tokens=4)
  words = TEXT.split()

  def ex(row, act):
    acts = [act if w == 'effusion' else 0.0 for w in words]
    return {
        'study_id': 's',
        'row': row,
        'position': 6,
        'kind': 'report',
        'activation': act,
        'tokens': words,
        'acts': acts,
        'target': 6,
    }

  record = {
      'feature': 3,
      'max': 2.0,
      'top': [ex(0, 2.0)],
      'quantiles': [[ex(1, 1.0)]],
      'negatives': [],
  }
  e = explain.explain_feature(record, chat, chat, n_top=1, n_quantile=1, score_batch=4, seed=0)
  assert e['feature'] == 3 and isinstance(e['explanation'], str) and e['score'] is None
  assert e['explainer'] == e['scorer'] == chat.name


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(ValueError, match='dtype'):
    local_llm.LocalChat(str(tmp_path), dtype='float33')
  with pytest.raises(ValueError, match='neither a local directory'):
    local_llm.LocalChat('./no/such/model')
  with pytest.raises(ValueError, match='max_new_tokens'):
    local_llm.LocalChat(str(tmp_path), max_new_tokens=0)


def test_render_chat_keeps_a_system_role_the_template_knows():
  tok = tiny_model.make_tokenizer(['x'])
  tok.chat_template = (
      "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
      '{% if add_generation_prompt %}<assistant>{% endif %}'
  )
  assert local_llm.render_chat(tok, MESSAGES) == (
      '<system>answer briefly\n<user>the patient has a small effusion\n<assistant>'
  )
  with pytest.raises(ValueError, match='string content'):
    local_llm.render_chat(tok, [{'role': 'user', 'content': ['x']}])
