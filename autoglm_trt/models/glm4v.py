"""Glm4vForConditionalGeneration: vision tower + text decoder + LM head, on flat token batches."""

from __future__ import annotations

import torch
from torch import nn

from autoglm_trt.config import ModelConfig
from autoglm_trt.layers.embedding import ParallelLMHead
from autoglm_trt.models.glm4v_text import Glm4vTextModel
from autoglm_trt.models.glm4v_vision import Glm4vVisionModel


class Glm4vForConditionalGeneration(nn.Module):
    packed_modules = Glm4vTextModel.packed_modules

    def __init__(self, cfg: ModelConfig, with_vision: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.language_model = Glm4vTextModel(cfg.text)
        self.visual = Glm4vVisionModel(cfg.vision) if with_vision else None
        self.lm_head = ParallelLMHead(cfg.text.vocab_size, cfg.text.hidden_size)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]; rows at <|image|> tokens are replaced by image_embeds in order."""
        x = self.language_model.embed_tokens(input_ids)
        if image_embeds is not None and image_embeds.numel():
            mask = input_ids == self.cfg.image_token_id
            if int(mask.sum()) != image_embeds.shape[0]:
                raise ValueError(f"{int(mask.sum())} image tokens but {image_embeds.shape[0]} image embeddings")
            x = x.clone()
            x[mask] = image_embeds.to(x.dtype)
        return x

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_values [N, C*T*P*P] -> [sum(t*h*w) / merge^2, hidden]."""
        if self.visual is None:
            raise RuntimeError("this model was built without its vision tower")
        return self.visual(pixel_values, grid_thw)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [T, hidden], positions [3, T] -> final hidden states [T, hidden]."""
        return self.language_model(inputs_embeds, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> logits [B, vocab] in float32."""
        return self.lm_head(hidden).float()
