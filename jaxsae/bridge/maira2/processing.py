"""MAIRA-2's processor: its prompts, its image normalisation, and reading its grounded output.

Behaviour it reproduces (learnt from MAIRA-2's public `processing_maira2.py`, written anew here):
- every image is made greyscale and min-max stretched to [0, 255] before the image processor
  (RAD-DINO's: shortest edge 518, centre crop 518 x 518, mean/std 0.5307/0.2583), then
  (518 / 14)^2 = 1369 `<image>` tokens stand for it (`num_additional_image_tokens` 1 cancels the
  CLS token the "default" strategy drops);
- the findings prompt names the images present in the order frontal, lateral, prior frontal,
  adds ` PRIOR_REPORT: ...` with a prior image only, then INDICATION / TECHNIQUE / COMPARISON,
  "N/A" for a missing section; the grounded variant asks for boxes; the chat template (the
  checkpoint's own) puts the system prompt and USER / ASSISTANT turns around it;
- grounded output `<obj>phrase<box><xN><yN><xN><yN></box></obj>` (jaxsae.bridge.maira2.grounding).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import transformers
from PIL import Image

from jaxsae.bridge.maira2 import grounding

MISSING = 'N/A'
_FINDINGS = (
    ' Provide a structured description of the findings in the radiology study in comparison to the'
    ' prior frontal image.'
)
_GROUNDED = (
    ' Each finding should be described as a self-contained plain-text sentence. If the finding is'
    ' groundable, locate the finding in the current frontal chest X-ray image, with bounding boxes'
    ' indicating all locations where it can be seen in the current frontal image. Otherwise,'
    ' generate just the ungrounded finding without bounding boxes.'
)
_PHRASE = (
    ' Repeat the following finding as a grounded phrase with bounding boxes indicating all'
    ' locations where it can be seen in the given chest X-ray image. Finding: '
)


def section(text: str | None) -> str:
  """A section's text, or "N/A" when it is missing or empty."""
  return text if isinstance(text, str) and text else MISSING


def normalise_image(image: Image.Image) -> Image.Image:
  """Greyscale with intensities stretched to [0, 255] (a constant image stays black).

  Computed as a 256-entry lookup table on the 8-bit pixels (the same values as stretching every
  pixel in float64, at a fraction of the cost on a 2.5k x 3k radiograph)."""
  grey = image if image.mode == 'L' else image.convert('L')
  lo, hi = grey.getextrema()
  levels = np.arange(256, dtype=np.float64) - lo
  if hi > lo:
    levels *= 255 / (hi - lo)
  return grey.point(np.clip(levels, 0, 255).astype(np.uint8).tolist())


def _text(t: str) -> dict[str, Any]:
  return {'index': None, 'text': t, 'type': 'text'}


def _image(i: int) -> dict[str, Any]:
  return {'index': i, 'text': None, 'type': 'image'}


def _turns(user: list[dict[str, Any]], assistant_text: str | None) -> list[dict[str, Any]]:
  messages = [{'content': user, 'role': 'user'}]
  if assistant_text is not None:
    messages.append({'content': [_text(assistant_text)], 'role': 'assistant'})
  return messages


def reporting_messages(
    has_lateral: bool,
    has_prior: bool,
    indication: str | None,
    technique: str | None,
    comparison: str | None,
    prior_report: str | None,
    assistant_text: str | None = None,
    get_grounding: bool = False,
) -> list[dict[str, Any]]:
  """The chat messages of MAIRA-2's (grounded) findings-generation task."""
  if not has_prior and not has_lateral:
    user = [_text('Given the current frontal image only'), _image(0)]
  else:
    user = [_text('Given the current frontal image'), _image(0)]
    if has_prior:
      if has_lateral:
        user += [_text(' the current lateral image'), _image(1)]
      user += [_text(' and the prior frontal image'), _image(1 + has_lateral)]
    else:
      user += [_text(' and the current lateral image'), _image(1)]
  if has_prior:
    user.append(_text(f' PRIOR_REPORT: {section(prior_report)}'))
  user.append(
      _text(
          _FINDINGS
          + (_GROUNDED if get_grounding else '')
          + f' INDICATION: {section(indication)} TECHNIQUE: {section(technique)}'
          f' COMPARISON: {section(comparison)}'
      )
  )
  return _turns(user, assistant_text)


def phrase_grounding_messages(phrase: str, assistant_text: str | None = None) -> list[dict]:
  """The chat messages of MAIRA-2's phrase-grounding task (one frontal image)."""
  user = [_text('Given the current frontal image'), _image(0), _text(_PHRASE + phrase)]
  return _turns(user, assistant_text)


class Maira2Processor(transformers.LlavaProcessor):
  """LlavaProcessor with MAIRA-2's reporting and phrase-grounding inputs and its output reader.

  The method names are MAIRA-2's processor's, so code written for the released processor runs
  unchanged on this one.
  """

  def __init__(
      self,
      image_processor: Any = None,
      tokenizer: Any = None,
      patch_size: int | None = None,
      vision_feature_select_strategy: str | None = None,
      chat_template: str | None = None,
      image_token: str = '<image>',
      num_additional_image_tokens: int = 0,
      phrase_start_token: str = '<obj>',
      phrase_end_token: str = '</obj>',
      box_start_token: str = '<box>',
      box_end_token: str = '</box>',
      num_box_coord_bins: int = grounding.BINS,
      **kwargs: Any,
  ):
    super().__init__(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=chat_template,
        image_token=image_token,
        num_additional_image_tokens=num_additional_image_tokens,
        **kwargs,
    )
    self.phrase_start_token, self.phrase_end_token = phrase_start_token, phrase_end_token
    self.box_start_token, self.box_end_token = box_start_token, box_end_token
    if num_box_coord_bins != grounding.BINS:
      raise ValueError(f'num_box_coord_bins={num_box_coord_bins}; MAIRA-2 uses {grounding.BINS}.')
    self.num_box_coord_bins = num_box_coord_bins

  def _render(self, messages: list[dict[str, Any]], assistant_text: str | None) -> str:
    template = self.chat_template or self.tokenizer.chat_template  # chat_template.json's first
    return self.tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        add_generation_prompt=assistant_text is None,
        tokenize=False,
    )

  def format_reporting_input(
      self,
      current_frontal: Image.Image,
      current_lateral: Image.Image | None,
      prior_frontal: Image.Image | None,
      indication: str | None,
      technique: str | None,
      comparison: str | None,
      prior_report: str | None,
      get_grounding: bool = False,
      assistant_text: str | None = None,
  ) -> tuple[str, list[Image.Image]]:
    """(prompt text, normalised images in prompt order) of a reporting study."""
    images = [normalise_image(im) for im in (current_frontal, current_lateral, prior_frontal) if im]
    messages = reporting_messages(
        current_lateral is not None,
        prior_frontal is not None,
        indication,
        technique,
        comparison,
        prior_report,
        assistant_text,
        get_grounding,
    )
    return self._render(messages, assistant_text), images

  def format_and_preprocess_reporting_input(self, *args: Any, **kwargs: Any) -> Any:
    """Model inputs (input_ids, attention_mask, pixel_values) of a reporting study; keyword
    arguments that `format_reporting_input` does not take go to the processor call."""
    text, images = self.format_reporting_input(*args, **_pop_format_args(kwargs))
    return self(text=text, images=images, **kwargs)

  def format_phrase_grounding_input(
      self, frontal_image: Image.Image, phrase: str, assistant_text: str | None = None
  ) -> tuple[str, list[Image.Image]]:
    messages = phrase_grounding_messages(phrase, assistant_text)
    return self._render(messages, assistant_text), [normalise_image(frontal_image)]

  def format_and_preprocess_phrase_grounding_input(
      self, frontal_image: Image.Image, phrase: str, assistant_text: str | None = None, **kwargs
  ) -> Any:
    text, images = self.format_phrase_grounding_input(frontal_image, phrase, assistant_text)
    return self(text=text, images=images, **kwargs)

  def convert_output_to_plaintext_or_grounded_sequence(
      self, text: str
  ) -> str | list[tuple[str, list[grounding.Box] | None]]:
    """Plain text as is; grounded text as (phrase, boxes or None) pairs. Malformed markup is a
    ValueError naming what is wrong (grounding.parse reports it without raising)."""
    text = text.strip()
    if not any(
        t in text
        for t in (
            self.phrase_start_token,
            self.phrase_end_token,
            self.box_start_token,
            self.box_end_token,
        )
    ):
      return text
    parsed = grounding.parse(text)
    if parsed.problems:
      raise ValueError(f'malformed grounded output ({"; ".join(parsed.problems)}): {text!r}')
    return [(p.text, list(p.boxes) or None) for p in parsed.phrases]

  @staticmethod
  def adjust_box_for_original_image_size(
      box: grounding.Box, width: int, height: int
  ) -> grounding.Box:
    return grounding.adjust_box(box, width, height)


_FORMAT_ARGS = (
    'current_frontal',
    'current_lateral',
    'prior_frontal',
    'indication',
    'technique',
    'comparison',
    'prior_report',
    'get_grounding',
    'assistant_text',
)


def _pop_format_args(kwargs: dict[str, Any]) -> dict[str, Any]:
  return {k: kwargs.pop(k) for k in _FORMAT_ARGS if k in kwargs}
