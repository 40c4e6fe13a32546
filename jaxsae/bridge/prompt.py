"""MAIRA-2's reporting prompt, and what each of its tokens is: image, prompt, boilerplate or report.

A MAIRA-2 processor (jaxsae's port or the release's remote code) renders the prompt with its own
`format_reporting_input`; for any other LLaVA-style processor (the offline stand-in) the same chat
messages (jaxsae.bridge.maira2.processing.reporting_messages) go through its chat template. Either
way the images are normalised once and the processor runs once. Token kinds come from the rendered
text: the study's own section texts are `prompt`, the assistant's findings `report`, image
placeholders `image` and everything else — instructions, section labels, chat roles, "N/A" for a
missing section — `boilerplate`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from jaxsae.bridge import manifest
from jaxsae.bridge.maira2.processing import normalise_image, reporting_messages
from jaxsae.config import ConfigError
from jaxsae.formats.tokens import TOKEN_KINDS

IMAGE, PROMPT, BOILERPLATE, REPORT = (
    TOKEN_KINDS.index(k) for k in ('image', 'prompt', 'boilerplate', 'report')
)
FRONTAL, LATERAL, PRIOR = 0, 1, 2  # the store's `image` column
# A Vicuna-style template for processors without one (MAIRA-2's tokenizer brings its own).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<image>"
    "{% endif %}{% endfor %}{% if m['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    '{% if add_generation_prompt %}ASSISTANT:{% endif %}'
)


def _spans(
    text: str, study: manifest.Study, has_prior: bool, assistant_text: str | None
) -> list[tuple[int, int, int]]:
  """Character spans (start, stop, kind) of the study's own texts in the rendered prompt."""
  labelled = ([(' PRIOR_REPORT: ', study.prior_report, PROMPT)] if has_prior else []) + [
      ('INDICATION: ', study.indication, PROMPT),
      (' TECHNIQUE: ', study.technique, PROMPT),
      (' COMPARISON: ', study.comparison, PROMPT),
      ('', assistant_text, REPORT),
  ]
  spans, cursor = [], 0
  for label, value, kind in labelled:
    if not value:  # absent: "N/A" is boilerplate
      continue
    value = value.strip() if kind == REPORT else value
    at = text.find(label + value, cursor)
    if at < 0:
      what = label.strip(' :') or 'findings'
      raise ConfigError(
          f'study {study.study_id!r}: cannot find its {what} text in the prompt the '
          'processor rendered; token kinds would be wrong.'
      )
    spans.append((at + len(label), at + len(label) + len(value), kind))
    cursor = at + len(label) + len(value)
  return spans


class Prepared:
  """One study's model inputs and, per token, its kind, patch index and image."""

  def __init__(
      self,
      study: manifest.Study,
      inputs: dict[str, torch.Tensor],
      kinds: np.ndarray,
      patch: np.ndarray,
      image: np.ndarray,
  ):
    self.study, self.inputs = study, inputs
    self.input_ids = inputs['input_ids'][0]
    self.kinds, self.patch, self.image = kinds, patch, image


def prepare(
    processor: Any,
    study: manifest.Study,
    images: dict[str, Image.Image | None],
    teacher_forcing: bool,
    image_token_id: int,
) -> Prepared:
  """Model inputs for `study` and the kind of every input token."""
  frontal, lateral, prior = (images.get(f) for f in manifest.IMAGE_FIELDS)
  assistant = study.findings if teacher_forcing else None
  args = dict(
      current_frontal=frontal,
      current_lateral=lateral,
      prior_frontal=prior,
      indication=study.indication,
      technique=study.technique,
      comparison=study.comparison,
      prior_report=study.prior_report,
      get_grounding=False,
      assistant_text=assistant,
  )
  if hasattr(processor, 'format_reporting_input'):  # MAIRA-2's processor
    text, ordered = processor.format_reporting_input(**args)
    inputs = processor(text=text, images=ordered, return_tensors='pt')
  else:
    messages = reporting_messages(
        lateral is not None,
        prior is not None,
        study.indication,
        study.technique,
        study.comparison,
        study.prior_report,
        assistant,
    )
    tokenizer = processor.tokenizer
    template = (
        tokenizer.chat_template
        or getattr(processor, 'chat_template', None)
        or DEFAULT_CHAT_TEMPLATE
    )
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=assistant is None, tokenize=False
    )
    ordered = [normalise_image(im) for im in (frontal, lateral, prior) if im is not None]
    inputs = processor(text=text, images=ordered, return_tensors='pt')
  roles = (
      [FRONTAL]
      + ([LATERAL] if lateral is not None else [])
      + ([PRIOR] if prior is not None else [])
  )
  spans = _spans(text, study, prior is not None, assistant)
  kinds, patch, image = _token_kinds(
      processor.tokenizer, text, spans, inputs['input_ids'][0], image_token_id, roles, study
  )
  return Prepared(study, dict(inputs), kinds, patch, image)


def _token_kinds(tokenizer, text, spans, input_ids, image_token_id, roles, study):
  """Tokenise the rendered text with character offsets, expand each image placeholder to the
  processor's image tokens, and check the result is exactly the processor's input_ids."""
  enc = tokenizer(text, return_offsets_mapping=True)
  ids, offsets = enc['input_ids'], enc['offset_mapping']
  n_placeholders = sum(i == image_token_id for i in ids)
  n_image_tokens = int((input_ids == image_token_id).sum())
  if n_placeholders != len(roles) or n_image_tokens % max(n_placeholders, 1):
    raise ConfigError(
        f'study {study.study_id!r}: {len(roles)} images but {n_placeholders} image '
        f'placeholders and {n_image_tokens} image tokens in the inputs.'
    )
  per_image = n_image_tokens // max(n_placeholders, 1)
  char_kind = np.full(len(text) + 1, BOILERPLATE, np.int8)
  for a, b, kind in spans:
    char_kind[a:b] = kind
  out_ids, kinds, patch, image = [], [], [], []
  seen_images = 0
  for tid, (a, b) in zip(ids, offsets):
    if tid == image_token_id:
      out_ids += [tid] * per_image
      kinds += [IMAGE] * per_image
      patch += list(range(per_image))
      image += [roles[seen_images]] * per_image
      seen_images += 1
      continue
    stripped = [i for i in range(a, b) if not text[i].isspace()]
    out_ids.append(tid)
    kinds.append(char_kind[stripped[0]] if stripped else BOILERPLATE)
    patch.append(-1)
    image.append(-1)
  if out_ids != input_ids.tolist():
    raise ConfigError(
        f"study {study.study_id!r}: the processor's input_ids differ from the "
        'tokenised prompt text, so token kinds cannot be assigned. Is the tokenizer '
        'a fast tokenizer, and does the processor add tokens of its own?'
    )
  return np.array(kinds, np.int32), np.array(patch, np.int32), np.array(image, np.int32)
