"""A tiny, randomly initialised MAIRA-2 saved in the Hub checkpoint's own on-disk layout.

What makes it MAIRA-2's layout rather than a small LLaVA (so loading, prompts and hooks are tested
against the real thing's form; only the widths and depths are small):
- config.json: `model_type` "maira2", `architectures` [Maira2ForConditionalGeneration], `auto_map`
  to the remote code's classes, `projector_n_layers` 4, `image_token_index` 32204,
  `image_seq_length` 1369, `vision_feature_layer` -1 with strategy "default"; a Dinov2 *backbone*
  vision config at 518 px / patch 14 whose one output stage is its last block (LayerNorm applied,
  hidden states not reshaped); a Llama text config with vocabulary 32207 and linear RoPE scaling
  1.5, written in the pre-5.0 form (`rope_scaling`) the released file uses;
- weights: sharded safetensors with model.safetensors.index.json, under the released key names
  (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`,
  `multi_modal_projector.layers.{0,2,4,6}.*`), which loading must rename;
- tokenizer: Llama-style (byte-fallback BPE over "▁"-prefixed words, `<s>` prepended, ids 0-2 for
  `<unk>`, `<s>`, `</s>`), 32000 base ids, then MAIRA-2's added tokens `<obj>` 32000, `</obj>`
  32001, `<x0>`..`<x99>`, `<y0>`..`<y99>`, `<box>` 32202, `</box>` 32203, `<image>` 32204;
- preprocessor_config.json (BitImageProcessor: shortest edge 518, centre crop 518, mean/std
  0.5307/0.2583), processor_config.json (patch 14, strategy "default",
  `num_additional_image_tokens` 1), chat_template.json (the system prompt, USER / ASSISTANT turns),
  generation_config.json.
The base vocabulary is trained on the texts given (the demo's) and padded with unused pieces to
32000 ids; ids 32205 and 32206 exist in the embedding only (32207 rows, as the release has).
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxsae.bridge.maira2 import modeling

BASE_VOCAB = 32000
VOCAB = 32207
IMAGE_SIZE, PATCH = 518, 14
SYSTEM_PROMPT = (
    'You are an expert radiology assistant tasked with interpreting a chest X-ray study.'
)
ADDED = ['<obj>', '</obj>'] + [f'<x{i}>' for i in range(100)] + [f'<y{i}>' for i in range(100)]
ADDED += ['<box>', '</box>', '<image>']
# Renders MAIRA-2's messages (jaxsae.bridge.maira2.processing): system prompt, then "USER: ...
# ASSISTANT: ...</s>" turns; a generation prompt ends at "ASSISTANT:".
CHAT_TEMPLATE = (
    "{{ '" + SYSTEM_PROMPT + "' }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ ' USER: ' }}{% else %}"
    "{{ ' ASSISTANT: ' }}{% endif %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
    "{{ c['text'] }}{% else %}<image>{% endif %}{% endfor %}{% if m['role'] == 'assistant' %}"
    "{{ '</s>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}"
    '{% endif %}'
)


def make_tokenizer(texts: Iterable[str]) -> transformers.PreTrainedTokenizerFast:
  """A Llama-style tokenizer trained on `texts`, padded to 32000 ids, with MAIRA-2's tokens."""

  def fresh(model):
    tok = Tokenizer(model)
    # Words are pieces starting with '▁' (SentencePiece's convention): merges never cross a space.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement='▁', prepend_scheme='first', split=True
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace('▁', ' '),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(' ', 1, 0),
        ]
    )
    return tok

  specials = ['<unk>', '<s>', '</s>']
  byte_pieces = [f'<0x{b:02X}>' for b in range(256)]
  trained = fresh(models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=True))
  trainer = trainers.BpeTrainer(
      vocab_size=4000, special_tokens=specials + byte_pieces, show_progress=False
  )
  trained.train_from_iterator(list(texts), trainer)
  spec = json.loads(trained.to_str())['model']
  vocab = dict(spec['vocab'])
  filler = (f'▁<unused{i}>' for i in range(BASE_VOCAB))
  while len(vocab) < BASE_VOCAB:
    vocab[next(filler)] = len(vocab)
  merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in spec['merges']]
  tok = fresh(
      models.BPE(vocab=vocab, merges=merges, unk_token='<unk>', byte_fallback=True, fuse_unk=True)
  )
  tok.add_special_tokens(specials)
  tok.post_processor = processors.TemplateProcessing(
      single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', 1)]
  )
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token='<s>',
      eos_token='</s>',
      unk_token='<unk>',
      pad_token='<unk>',
      padding_side='right',
  )
  fast.add_tokens(ADDED[:-1])  # grounding markup: ordinary added tokens, kept by decode
  fast.add_special_tokens({'additional_special_tokens': ['<image>']})
  got = fast.convert_tokens_to_ids(['<obj>', '<box>', '</box>', '<image>'])
  if got != [32000, 32202, 32203, 32204]:
    raise AssertionError(f'added token ids {got}; the base vocabulary is not 32000 ids.')
  return fast


def config(hidden: int, layers: int, vision_hidden: int, vision_layers: int) -> dict:
  """config.json as the release writes it (the transformers-4 form, remote-code auto_map)."""
  return {
      'architectures': [modeling.ARCHITECTURE],
      'auto_map': {
          'AutoConfig': 'configuration_maira2.Maira2Config',
          'AutoModelForCausalLM': 'modeling_maira2.Maira2ForConditionalGeneration',
      },
      'model_type': modeling.MODEL_TYPE,
      'hidden_size': hidden,
      'ignore_index': -100,
      'image_seq_length': (IMAGE_SIZE // PATCH) ** 2,
      'image_token_index': 32204,
      'multimodal_projector_bias': True,
      'pad_token_id': 0,
      'projector_hidden_act': 'gelu',
      'projector_n_layers': 4,
      'torch_dtype': 'float32',
      'vision_feature_layer': -1,
      'vision_feature_select_strategy': 'default',
      'text_config': {
          'architectures': ['LlamaForCausalLM'],
          'model_type': 'llama',
          'hidden_size': hidden,
          'intermediate_size': 2 * hidden,
          'num_hidden_layers': layers,
          'num_attention_heads': 4,
          'num_key_value_heads': 4,
          'max_position_embeddings': 8192,
          'rms_norm_eps': 1e-5,
          'rope_scaling': {'factor': 1.5, 'type': 'linear'},
          'rope_theta': 10000.0,
          'vocab_size': VOCAB,
          'bos_token_id': 1,
          'eos_token_id': 2,
          'pad_token_id': 0,
          'tie_word_embeddings': False,
          'torch_dtype': 'float32',
      },
      'vision_config': {
          'architectures': ['Dinov2Model'],
          'model_type': 'dinov2',
          'hidden_size': vision_hidden,
          'num_hidden_layers': vision_layers,
          'num_attention_heads': 2,
          'mlp_ratio': 2,
          'image_size': IMAGE_SIZE,
          'patch_size': PATCH,
          'layerscale_value': 1e-5,
          'apply_layernorm': True,
          'reshape_hidden_states': False,
          'out_features': [f'stage{vision_layers}'],
          'out_indices': [vision_layers],
          'torch_dtype': 'float32',
      },
  }


def _released_name(key: str) -> str:
  """This port's parameter name -> the released checkpoint's (CHECKPOINT_KEY_MAPPING undone)."""
  for ours, released in (
      ('lm_head.', 'language_model.lm_head.'),
      ('model.language_model.', 'language_model.model.'),
      ('model.vision_tower.', 'vision_tower.'),
      ('model.multi_modal_projector.', 'multi_modal_projector.'),
  ):
    if key.startswith(ours):
      return released + key[len(ours) :]
  raise KeyError(f'no released name for parameter {key!r}')


def save_weights(model: torch.nn.Module, out_dir: str, shards: int = 2) -> None:
  """`model`'s weights into `out_dir` as the release stores them: sharded safetensors under the
  released key names with model.safetensors.index.json, replacing any weight files there."""
  state = {_released_name(k): v.detach().cpu() for k, v in model.state_dict().items()}
  for f in os.listdir(out_dir):
    if f.startswith('model') and (f.endswith('.safetensors') or f.endswith('.index.json')):
      os.remove(os.path.join(out_dir, f))
  names = sorted(state)
  per = -(-len(names) // shards)
  weight_map, total = {}, 0
  for i in range(shards):
    part = names[i * per : (i + 1) * per]
    file = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
    save_file(
        {k: state[k].contiguous() for k in part}, os.path.join(out_dir, file), {'format': 'pt'}
    )
    for k in part:
      weight_map[k] = file
      total += state[k].numel() * state[k].element_size()
  _write_json(
      out_dir,
      'model.safetensors.index.json',
      {'metadata': {'total_size': total}, 'weight_map': weight_map},
  )


def _release_tokenizer_files(out_dir: str, tokenizer: transformers.PreTrainedTokenizerFast) -> None:
  """tokenizer_config.json, special_tokens_map.json and added_tokens.json as a transformers-4
  Llama tokenizer writes them (the release's), in place of today's 'TokenizersBackend' form."""
  path = os.path.join(out_dir, 'tokenizer_config.json')
  with open(path) as f:
    cfg = json.load(f)
  for key in ('backend', 'extra_special_tokens'):
    cfg.pop(key, None)
  cfg.update(
      tokenizer_class='LlamaTokenizer',
      add_bos_token=True,
      add_eos_token=False,
      legacy=False,
      clean_up_tokenization_spaces=False,
      additional_special_tokens=['<image>'],
      model_max_length=8192,
  )
  _write_json(out_dir, 'tokenizer_config.json', cfg)
  special = {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': '<unk>'}
  _write_json(
      out_dir, 'special_tokens_map.json', special | {'additional_special_tokens': ['<image>']}
  )
  _write_json(out_dir, 'added_tokens.json', {t: tokenizer.convert_tokens_to_ids(t) for t in ADDED})


def _write_json(out_dir: str, name: str, obj: dict) -> None:
  with open(os.path.join(out_dir, name), 'w') as f:
    json.dump(obj, f, indent=2)


def build(
    out_dir: str,
    texts: Iterable[str],
    hidden: int = 64,
    layers: int = 17,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    seed: int = 0,
) -> str:
  """Write a tiny MAIRA-2 to `out_dir`: 17 decoder layers, so that layer 15 exists and, as in the
  32-layer original, is not the last (the last layer's hidden state is the final-norm one)."""
  torch.manual_seed(seed)
  transformers.utils.logging.disable_progress_bar()
  os.makedirs(out_dir, exist_ok=True)
  raw = config(hidden, layers, vision_hidden, vision_layers)
  _write_json(out_dir, 'config.json', raw)
  model = modeling.Maira2ForConditionalGeneration(
      modeling.Maira2Config.from_pretrained(out_dir)
  ).eval()
  with torch.no_grad():  # the release's scale of weights matters little; keep activations O(1)
    for name, p in model.named_parameters():
      if re.search(r'(norm|layernorm).*weight$', name):
        p.fill_(1.0)
  save_weights(model, out_dir)
  tokenizer = make_tokenizer(list(texts) + [SYSTEM_PROMPT, 'USER: ASSISTANT: N/A'])
  tokenizer.save_pretrained(out_dir)
  _release_tokenizer_files(out_dir, tokenizer)
  _write_json(
      out_dir,
      'preprocessor_config.json',
      {
          'crop_size': {'height': IMAGE_SIZE, 'width': IMAGE_SIZE},
          'do_center_crop': True,
          'do_convert_rgb': True,
          'do_normalize': True,
          'do_rescale': True,
          'do_resize': True,
          'image_mean': [0.5307, 0.5307, 0.5307],
          'image_std': [0.2583, 0.2583, 0.2583],
          'image_processor_type': 'BitImageProcessor',
          'processor_class': 'Maira2Processor',
          'resample': 3,
          'rescale_factor': 1 / 255,
          'size': {'shortest_edge': IMAGE_SIZE},
      },
  )
  _write_json(
      out_dir,
      'processor_config.json',
      {
          'auto_map': {'AutoProcessor': 'processing_maira2.Maira2Processor'},
          'processor_class': 'Maira2Processor',
          'image_token': '<image>',
          'num_additional_image_tokens': 1,
          'patch_size': PATCH,
          'vision_feature_select_strategy': 'default',
          'phrase_start_token': '<obj>',
          'phrase_end_token': '</obj>',
          'box_start_token': '<box>',
          'box_end_token': '</box>',
          'num_box_coord_bins': 100,
      },
  )
  _write_json(out_dir, 'chat_template.json', {'chat_template': CHAT_TEMPLATE})
  _write_json(
      out_dir,
      'generation_config.json',
      {'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': 0, 'max_new_tokens': 300},
  )
  return out_dir
