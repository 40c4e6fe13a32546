"""A local transformers model as the explainer/scorer LLM (no server, no network).

Implements `jaxsae.interpret.llm.ChatModel`, so the interpretation stage can run offline, e.g. on
the demo's tiny LLaVA stand-in. It lives in the bridge because it imports torch and transformers,
which `jaxsae.interpret` must not.
"""

from __future__ import annotations

import os
import threading

import torch

from jaxsae.bridge import loading


def _as_parts(messages: list[dict]) -> list[dict]:
  """Messages with content as [{'type': 'text', 'text': ...}] (LLaVA-style chat templates)."""
  return [{**m, 'content': [{'type': 'text', 'text': m['content']}]} for m in messages]


def _system_into_user(messages: list[dict]) -> list[dict]:
  """For templates that reject a system role: prepend it to the first user message."""
  system = '\n\n'.join(m['content'] for m in messages if m['role'] == 'system')
  rest = [dict(m) for m in messages if m['role'] != 'system']
  if system and rest:
    rest[0]['content'] = f'{system}\n\n{rest[0]["content"]}'
  return rest


def _apply(tokenizer, messages: list[dict]) -> str | None:
  """The template's rendering if it shows every message's text (string content, else LLaVA-style
  content parts), else None."""
  for msgs in (messages, _as_parts(messages)):
    try:
      text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:  # pylint: disable=broad-except  # jinja errors: try the next form
      continue
    if isinstance(text, str) and all(m['content'] in text for m in messages):
      return text
  return None


def render_chat(tokenizer, messages: list[dict]) -> str:
  """The prompt text: the tokenizer's chat template if it renders every message's text, with the
  system turn merged into the first user turn when the template has no system role (it fails, or
  renders 'system' like 'assistant', as Vicuna-style templates do); else a plain 'role: content'
  join ending in 'assistant:'."""
  for m in messages:
    if not isinstance(m.get('content'), str) or 'role' not in m:
      raise ValueError(f'chat messages need a role and string content; got {m!r:.200}.')
  if getattr(tokenizer, 'chat_template', None):
    text = _apply(tokenizer, messages)
    if text is not None and any(m['role'] == 'system' for m in messages):
      as_assistant = [{**m, 'role': 'assistant'} if m['role'] == 'system' else m for m in messages]
      if _apply(tokenizer, as_assistant) == text:
        text = None  # the template does not know the system role
    text = text if text is not None else _apply(tokenizer, _system_into_user(messages))
    if text is not None:
      return text
  lines = [f'{m["role"]}: {m["content"]}' for m in messages]
  return '\n'.join(lines + ['assistant:'])


class LocalChat:
  """Greedy decoding with a local causal LM (or the text part of a LLaVA-style model).

  `temperature` is ignored (decoding is greedy, hence deterministic), and each call generates at
  most min(max_tokens, max_new_tokens) tokens. Calls are serialised by a lock: one model on one
  device gains nothing from concurrent generate() calls.
  """

  def __init__(
      self,
      model_name_or_path: str,
      device: str = 'cpu',
      dtype: str = 'float32',
      max_new_tokens: int = 256,
      trust_remote_code: bool = False,
  ):
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
      raise ValueError(
          f"dtype={dtype!r} is not a torch dtype; use 'float32', 'bfloat16' or " "'float16'."
      )
    if max_new_tokens < 1:
      raise ValueError(f'interpret.llm.max_new_tokens={max_new_tokens} must be >= 1.')
    if not os.path.isdir(model_name_or_path) and model_name_or_path.count('/') != 1:
      raise ValueError(
          f'interpret.llm.model={model_name_or_path!r} is neither a local directory '
          'nor a Hub id (org/name).'
      )
    model, processor = loading.load_model(
        model_name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )
    self.tokenizer = getattr(processor, 'tokenizer', processor)
    self.model = model
    self.device = torch.device(device)
    self.max_new_tokens = int(max_new_tokens)
    self.name = f'local:{model_name_or_path}'
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f'LocalChat({self.name!r}, device={str(self.device)!r})'

  def complete(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0) -> str:
    """The model's reply: only the newly generated tokens, decoded without special tokens."""
    del temperature  # greedy
    tok = self.tokenizer
    text = render_chat(tok, messages)
    has_bos = bool(tok.bos_token) and text.startswith(tok.bos_token)
    enc = tok(text, return_tensors='pt', add_special_tokens=not has_bos).to(self.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with self._lock, torch.no_grad():
      out = self.model.generate(
          **enc,
          max_new_tokens=max(1, min(max_tokens, self.max_new_tokens)),
          do_sample=False,
          pad_token_id=pad,
      )
    new = out[0, enc['input_ids'].shape[1] :]
    return tok.decode(new, skip_special_tokens=True).strip()
