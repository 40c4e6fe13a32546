"""A tiny randomly initialised LLaVA model, saved like a Hub checkpoint: MAIRA-2's stand-in offline.

MAIRA-2's `Maira2ForConditionalGeneration` subclasses transformers' `LlavaForConditionalGeneration`,
so a small LLaVA (CLIP-style vision tower, Llama decoder), a word-level tokenizer with a
Vicuna-style chat template and a CLIP image processor exercise the same loading
(`from_pretrained`), prompt, hook and export code paths as the real model, in seconds and without
network.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from jaxsae.bridge import prompt

SPECIAL = ('<pad>', '<s>', '</s>', '<unk>', '<image>')
CHAT_TEMPLATE = prompt.DEFAULT_CHAT_TEMPLATE  # Vicuna-style turns over MAIRA-2's messages


def _pre_tokenizer():
  return pre_tokenizers.Whitespace()


def words(texts: Iterable[str]) -> list[str]:
  """The tokenizer's vocabulary for `texts`: lower-cased words and punctuation runs, sorted."""
  norm, pre = normalizers.Lowercase(), _pre_tokenizer()
  vocab = set()
  for text in texts:
    vocab.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
  return sorted(vocab - set(SPECIAL))


def make_tokenizer(vocabulary: Iterable[str]) -> transformers.PreTrainedTokenizerFast:
  vocab = {t: i for i, t in enumerate(list(SPECIAL) + sorted(set(vocabulary) - set(SPECIAL)))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = _pre_tokenizer()
  tok.add_special_tokens(list(SPECIAL))
  tok.post_processor = processors.TemplateProcessing(
      single='<s> $A', pair='<s> $A $B', special_tokens=[('<s>', vocab['<s>'])]
  )
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token='<s>',
      eos_token='</s>',
      unk_token='<unk>',
      pad_token='<pad>',
      chat_template=CHAT_TEMPLATE,
      padding_side='right',
  )


def _clip_image_processor():
  """The PIL-backed CLIP image processor (the default one wants torchvision, which we avoid)."""
  try:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil
  except ImportError:  # older transformers: the default one is PIL-backed
    return transformers.CLIPImageProcessor


def build(
    out_dir: str,
    vocabulary: Iterable[str],
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    image_size: int = 56,
    patch: int = 14,
    seed: int = 0,
) -> str:
  """Write model, tokenizer and processor to `out_dir` (loadable with `from_pretrained`)."""
  torch.manual_seed(seed)
  transformers.utils.logging.disable_progress_bar()
  tokenizer = make_tokenizer(vocabulary)
  image_processor = _clip_image_processor()(
      size={'shortest_edge': image_size}, crop_size={'height': image_size, 'width': image_size}
  )
  processor = transformers.LlavaProcessor(
      image_processor=image_processor,
      tokenizer=tokenizer,
      patch_size=patch,
      vision_feature_select_strategy='default',
      chat_template=CHAT_TEMPLATE,
      image_token='<image>',
      num_additional_image_tokens=1,
  )
  vision = transformers.CLIPVisionConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=image_size,
      patch_size=patch,
  )
  text = transformers.LlamaConfig(
      vocab_size=len(tokenizer),
      hidden_size=hidden,
      intermediate_size=2 * hidden,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      num_key_value_heads=heads,
      max_position_embeddings=2048,
      pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id,
  )
  config = transformers.LlavaConfig(
      vision_config=vision,
      text_config=text,
      image_token_index=tokenizer.convert_tokens_to_ids('<image>'),
      image_seq_length=(image_size // patch) ** 2,
      vision_feature_select_strategy='default',
      vision_feature_layer=-2,
  )
  model = transformers.LlavaForConditionalGeneration(config).eval()
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir)
  processor.save_pretrained(out_dir)
  return out_dir
