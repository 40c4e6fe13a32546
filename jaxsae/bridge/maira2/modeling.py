"""MAIRA-2's model classes in the LLaVA layout of current transformers, and how to load the Hub
checkpoint into them without its remote code.

Why: MAIRA-2's own code (`modeling_maira2.py`, loaded with `trust_remote_code`) builds
`vision_tower`, `multi_modal_projector` and `language_model` directly on the
`LlavaForConditionalGeneration` subclass, the layout transformers used before 4.52. From 4.52 LLaVA
keeps them under `self.model`, so that code fails on its first forward pass, and the `dtype=`
argument of `from_pretrained` only exists from 4.56: no transformers runs the released code and
ours. This port is the same network on today's `LlavaModel`:

  vision tower  a Dinov2 *backbone* (`AutoBackbone`, RAD-DINO: ViT-B/14 at 518 px) whose single
                output stage is the last block, with the backbone's LayerNorm applied
                (`feature_maps`, not `hidden_states` as plain LLaVA takes);
  selection     `feature_maps[vision_feature_layer]`, CLS dropped for strategy "default":
                (518 / 14)^2 = 1369 tokens per image;
  projector     `projector_n_layers` Linear layers (4 in MAIRA-2: 768 -> 4096, then 4096 -> 4096)
                with the configured activation between them, an `nn.Sequential` named `layers`;
  language      Vicuna-7B (Llama), reached as `model.language_model`, head `lm_head`.

The Hub checkpoint stores the old names; `CHECKPOINT_KEY_MAPPING` renames them on load
(`language_model.model.` -> `model.language_model.`, `language_model.lm_head.` -> `lm_head.`,
`vision_tower.` / `multi_modal_projector.` -> under `model.`), so decoder layer 15 is
`model.language_model.layers.15` here and `language_model.model.layers.15` under the remote code.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import transformers
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava import modeling_llava

MODEL_TYPE = 'maira2'
ARCHITECTURE = 'Maira2ForConditionalGeneration'
# Old (released) key prefix -> this port's; order matters (the lm_head rule before language_model).
CHECKPOINT_KEY_MAPPING = {
    r'^language_model\.lm_head\.': 'lm_head.',
    r'^language_model\.model\.': 'model.language_model.',
    r'^vision_tower\.': 'model.vision_tower.',
    r'^multi_modal_projector\.': 'model.multi_modal_projector.',
}


class Maira2Config(transformers.LlavaConfig):
  """LlavaConfig plus the projector's depth; the vision config is a Dinov2 backbone's."""

  model_type = MODEL_TYPE

  def __init__(self, projector_n_layers: int = 4, **kwargs: Any):
    super().__init__(**kwargs)
    self.projector_n_layers = projector_n_layers


class Maira2MultiModalProjector(torch.nn.Module):
  """`projector_n_layers` Linear layers, the activation between each pair (parameter names
  `layers.{0,2,4,6}.*`, the checkpoint's)."""

  def __init__(self, config: Maira2Config):
    super().__init__()
    n = config.projector_n_layers
    if n < 1:
      raise ValueError(f'projector_n_layers must be at least 1, got {n}.')
    vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
    modules: list[torch.nn.Module] = [torch.nn.Linear(vision, text)]
    for _ in range(n - 1):
      modules += [ACT2FN[config.projector_hidden_act], torch.nn.Linear(text, text)]
    self.layers = torch.nn.Sequential(*modules)

  def forward(self, features: torch.Tensor) -> torch.Tensor:
    return self.layers(features)


class Maira2Model(modeling_llava.LlavaModel):
  """LlavaModel with MAIRA-2's backbone tower, deep projector and feature-map selection."""

  config_class = Maira2Config

  def __init__(self, config: Maira2Config):
    modeling_llava.LlavaPreTrainedModel.__init__(self, config)
    self.vision_tower = transformers.AutoBackbone.from_config(config.vision_config)
    self.multi_modal_projector = Maira2MultiModalProjector(config)
    self.language_model = transformers.AutoModel.from_config(config.text_config)
    self.post_init()

  def get_image_features(
      self,
      pixel_values: torch.Tensor,
      vision_feature_layer: int | None = None,
      vision_feature_select_strategy: str | None = None,
      **kwargs: Any,
  ) -> BaseModelOutputWithPooling:
    """Projected image tokens, one [1369, hidden] tensor per image in `pooler_output` (the
    contract LlavaModel.forward consumes)."""
    layer = (
        self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    )
    strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
    if not isinstance(layer, int):
      raise ValueError(f'MAIRA-2 selects one feature map; vision_feature_layer={layer!r}.')
    if strategy not in ('default', 'full'):
      raise ValueError(f'unknown vision_feature_select_strategy {strategy!r}.')
    out = self.vision_tower(pixel_values)
    selected = out.feature_maps[layer]
    if strategy == 'default':
      selected = selected[:, 1:]  # the CLS token is not an image token
    features = self.multi_modal_projector(selected)
    return BaseModelOutputWithPooling(last_hidden_state=selected, pooler_output=list(features))


class Maira2ForConditionalGeneration(modeling_llava.LlavaForConditionalGeneration):
  """The generation model: Maira2Model under `model`, the LM head as `lm_head`."""

  config_class = Maira2Config

  def __init__(self, config: Maira2Config):
    modeling_llava.LlavaPreTrainedModel.__init__(self, config)
    self.model = Maira2Model(config)
    self.lm_head = torch.nn.Linear(
        config.text_config.hidden_size, config.text_config.vocab_size, bias=False
    )
    self.post_init()


def rename(key: str) -> str:
  """A released checkpoint key's name in this port (what `key_mapping` does on load)."""
  for pattern, new in CHECKPOINT_KEY_MAPPING.items():
    renamed = re.sub(pattern, new, key)
    if renamed != key:
      return renamed
  return key


def is_maira2(config: dict[str, Any]) -> bool:
  """Whether a checkpoint's config.json describes MAIRA-2."""
  return config.get('model_type') == MODEL_TYPE or ARCHITECTURE in config.get('architectures', [])
