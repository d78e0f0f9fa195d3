"""CLIP-based scorers on transformers' ``CLIPModel``: PickScore, CLIP score and the LAION aesthetic predictor.

HPSv2 (:mod:`sspo.evaluation.scorers.hps`) is the same machinery with an open_clip checkpoint converted in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from sspo.evaluation.scorers.base import Scorer, from_pretrained, load_weights, resolve_file
from sspo.evaluation.scorers.heads import LinearMLP
from sspo.evaluation.scorers.preprocess import ClipTransform

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
CLIP_H_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L_MODEL = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)


class ClipEmbedder:
    """A CLIPModel with its tokenizer and image transform, giving L2-normalised embeddings."""

    def __init__(
        self,
        model,
        tokenizer=None,
        transform: Callable[[Sequence[Image.Image]], torch.Tensor] | None = None,
        clean_text: Callable[[str], str] | None = None,
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        side = model.config.vision_config.image_size
        self.transform = transform or ClipTransform(size=side, crop_size=side)
        self.clean_text = clean_text
        self.max_length = model.config.text_config.max_position_embeddings
        if tokenizer is not None:
            self.max_length = min(self.max_length, tokenizer.model_max_length)

    def to(self, device: torch.device, dtype: torch.dtype) -> ClipEmbedder:
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def _param(self) -> torch.Tensor:
        return self.model.logit_scale

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.transform(images).to(device=self._param.device, dtype=self._param.dtype)
        # get_*_features return a ModelOutput whose pooler_output is the projected embedding
        return F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)

    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.clean_text is not None:
            prompts = [self.clean_text(p) for p in prompts]
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self._param.device)
        output = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(output.pooler_output.float(), dim=-1)

    @classmethod
    def from_pretrained(
        cls, model_id: str, processor_id: str | None, crop_rounding: str, text: bool = True
    ) -> ClipEmbedder:
        """Model weights from ``model_id``; tokenizer and ``preprocessor_config.json`` from ``processor_id``."""
        from transformers import AutoTokenizer, CLIPModel

        processor_id = processor_id or model_id
        model = from_pretrained(CLIPModel, model_id, "CLIP model")
        tokenizer = from_pretrained(AutoTokenizer, processor_id, "CLIP tokenizer") if text else None
        config = resolve_file(processor_id, "preprocessor_config.json", "CLIP processor", optional=True)
        transform = ClipTransform.from_processor_config(
            config, model.config.vision_config.image_size, crop_rounding=crop_rounding
        )
        return cls(model, tokenizer, transform)


class ClipScorer(Scorer):
    """A scorer built around one :class:`ClipEmbedder`, moved to the scorer's device and dtype."""

    def __init__(self, embedder: ClipEmbedder, **kwargs):
        super().__init__(**kwargs)
        self.clip = embedder.to(self.device, self.dtype)

    def cosine(self, images, prompts) -> torch.Tensor:
        return (self.clip.images(images) * self.clip.texts(prompts)).sum(-1)


class PickScoreScorer(ClipScorer):
    """PickScore: ``logit_scale.exp() * cos(image, text)`` of the PickScore_v1 CLIP-H (about 20-23 for SD images)."""

    name = "pickscore"

    def _score_batch(self, images, prompts):
        return self.clip.model.logit_scale.float().exp() * self.cosine(images, prompts)

    @classmethod
    def from_pretrained(cls, path_or_id: str | None = None, *, processor: str | None = CLIP_H_PROCESSOR, **kwargs):
        # PickScore's reference code preprocesses with transformers' CLIPProcessor: floor crop.
        return cls(ClipEmbedder.from_pretrained(path_or_id or PICKSCORE_MODEL, processor, "floor"), **kwargs)


class ClipScoreScorer(ClipScorer):
    """CLIP score as torchmetrics defines it: ``max(100 * cos(image, text), 0)``."""

    name = "clip"

    def _score_batch(self, images, prompts):
        return (100 * self.cosine(images, prompts)).clamp(min=0)

    @classmethod
    def from_pretrained(cls, path_or_id: str | None = None, *, processor: str | None = None, **kwargs):
        return cls(ClipEmbedder.from_pretrained(path_or_id or CLIP_L_MODEL, processor, "floor"), **kwargs)


class AestheticScorer(ClipScorer):
    """LAION aesthetic predictor v2: the linear MLP head on the L2-normalised CLIP ViT-L/14 image embedding."""

    name = "aesthetic"

    def __init__(self, embedder: ClipEmbedder, head: LinearMLP, **kwargs):
        super().__init__(embedder, **kwargs)
        self.head = head.to(self.device)  # stays float32, as the reference casts embeddings to float

    def _score_batch(self, images, prompts):
        return self.head(self.clip.images(images))

    @classmethod
    def from_pretrained(cls, path_or_id: str | None = None, *, clip_model: str = CLIP_L_MODEL, **kwargs):
        """``path_or_id``: the head file, a folder or hub repo holding it, or a URL (default: the published one)."""
        head_file = resolve_file(path_or_id or AESTHETIC_HEAD_URL, AESTHETIC_HEAD_FILE, "aesthetic head")
        head = LinearMLP.from_state_dict(load_weights(head_file, "aesthetic head"), "aesthetic head")
        # The reference preprocesses with OpenAI CLIP's torchvision transform: round crop.
        return cls(ClipEmbedder.from_pretrained(clip_model, clip_model, "round", text=False), head, **kwargs)


__all__ = [
    "ClipEmbedder",
    "PickScoreScorer",
    "ClipScoreScorer",
    "AestheticScorer",
]
