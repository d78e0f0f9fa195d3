"""ImageReward, reimplemented on transformers' BLIP modules (the ``image-reward`` package breaks on transformers 5).

The published model (hub repo ``THUDM/ImageReward``: ``ImageReward.pt`` + ``med_config.json``) is
BLIP's ViT-L/16 image encoder, BLIP's BERT text encoder with cross attention to the image tokens in
every layer, and a linear MLP on the text encoder's [CLS] state:

    reward = (mlp(text_encoder(prompt, image_tokens)[:, 0]) - 0.16717362830052426) / 1.0333394966054072

transformers' ``BlipVisionModel`` and ``BlipTextModel`` are ports of exactly those BLIP modules, so the
published weights load by renaming keys (:func:`imagereward_to_hf`); nothing is approximated.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sspo.errors import ModelError
from sspo.evaluation.scorers.base import Scorer, from_pretrained, hf_from_state_dict, load_weights, rename_key, resolve_file
from sspo.evaluation.scorers.heads import LinearMLP
from sspo.evaluation.scorers.preprocess import ClipTransform
from sspo.io import read_json

IMAGEREWARD_REPO = "THUDM/ImageReward"
BERT_TOKENIZER = "bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35  # ImageReward tokenizes with padding="max_length", max_length=35

# Published (BLIP/timm ViT) key -> transformers BlipVisionModel key; block keys are under "blocks.N.".
_VISION_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.": "embeddings.patch_embedding.",
    "norm.": "post_layernorm.",
}
_VISION_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# BLIP_Pretrain's contrastive projections and the position-id buffer are not used for the reward.
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def imagereward_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split ``ImageReward.pt`` into ``{"vision": ..., "text": ..., "mlp": ...}`` state dicts for the HF modules."""
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "mlp": {}}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(_UNUSED):
            continue
        if key.startswith("blip.text_encoder."):  # BLIP's med.py BertModel: same layout as BlipTextModel
            parts["text"][key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp."):
            parts["mlp"][key[len("mlp."):]] = value
        elif key.startswith("blip.visual_encoder."):
            new = _vision_key(key[len("blip.visual_encoder."):])
            if new is None:
                unknown.append(key)
            else:
                parts["vision"][new] = value
        else:
            unknown.append(key)
    if unknown:
        raise ModelError("not an ImageReward state dict; unknown keys: " + ", ".join(unknown[:6]))
    return parts


def _vision_key(key: str) -> str | None:
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        module, param = rest.rsplit(".", 1)
        return f"encoder.layers.{index}.{_VISION_BLOCK[module]}.{param}" if module in _VISION_BLOCK else None
    return rename_key(key, _VISION_TOP)


def vision_config_from_weights(vision: dict[str, torch.Tensor]):
    """BLIP's ViT sizes from tensor shapes; heads are 64-wide in both BLIP ViTs (base 12, large 16)."""
    from transformers import BlipVisionConfig

    hidden = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    return BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=sum(1 for k in vision if k.endswith(".layer_norm1.weight")),
        num_attention_heads=max(1, hidden // 64),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT uses timm's LayerNorm(eps=1e-6), not transformers' default 1e-5
    )


def text_config_from_med(med: dict, encoder_width: int):
    """BLIP's ``med_config.json`` (a BertConfig with cross attention) as a BlipTextConfig."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_act=med.get("hidden_act", "gelu"),
        pad_token_id=med.get("pad_token_id", 0),
        encoder_hidden_size=encoder_width,  # BLIP overrides med_config's encoder_width with the ViT width
        is_decoder=True,  # transformers builds the cross-attention layers only for "decoders"
    )


class ImageRewardModel(nn.Module):
    """BLIP image encoder -> BLIP text encoder cross-attending to the image tokens -> linear head on [CLS]."""

    def __init__(self, vision, text, mlp: LinearMLP):
        super().__init__()
        self.vision, self.text, self.mlp = vision, text, mlp

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The normalised reward, one per (image, prompt) row."""
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        # ImageReward passes an all-ones image mask, the same as none; is_decoder=False keeps the
        # text self-attention bidirectional, as BLIP's encoder mode does.
        text = self.text(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens, is_decoder=False
        ).last_hidden_state
        return (self.mlp(text[:, 0].float()) - REWARD_MEAN) / REWARD_STD

    @classmethod
    def from_published(cls, state_dict: dict[str, torch.Tensor], med_config: dict) -> ImageRewardModel:
        from transformers import BlipTextModel, BlipVisionModel

        parts = imagereward_to_hf(state_dict)
        if not parts["vision"] or not parts["text"]:
            raise ModelError("not an ImageReward state dict: no blip.visual_encoder.* or blip.text_encoder.* keys")
        vision_config = vision_config_from_weights(parts["vision"])
        vision = hf_from_state_dict(BlipVisionModel, vision_config, parts["vision"], "ImageReward image encoder")
        text_config = text_config_from_med(med_config, vision_config.hidden_size)
        text = hf_from_state_dict(
            BlipTextModel, text_config, parts["text"], "ImageReward text encoder", add_pooling_layer=False
        )
        return cls(vision, text, LinearMLP.from_state_dict(parts["mlp"], "ImageReward MLP head"))


class ImageRewardScorer(Scorer):
    """ImageReward v1.0, normalised as published (about -0.2 to 0.6 for SD-1.5-class models)."""

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, **kwargs):
        super().__init__(**kwargs)
        self.model = model.eval().requires_grad_(False)
        self.model.vision.to(self.device, self.dtype)
        self.model.text.to(self.device, self.dtype)
        self.model.mlp.to(self.device)  # the reference casts the [CLS] state to float for the head
        self.tokenizer = tokenizer
        size = model.vision.config.image_size
        # ImageReward's own transform: OpenAI CLIP's torchvision recipe (round crop).
        self.transform = ClipTransform(size=size, crop_size=size, crop_rounding="round")

    def _score_batch(self, images, prompts):
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        ).to(self.device)
        pixels = self.transform(images).to(self.device, self.dtype)
        return self.model(pixels, tokens["input_ids"], tokens["attention_mask"])

    @classmethod
    def from_pretrained(cls, path_or_id: str | None = None, *, tokenizer: str = BERT_TOKENIZER, **kwargs):
        """``path_or_id``: a folder or hub repo with ``ImageReward.pt`` and ``med_config.json``
        (default ``THUDM/ImageReward``), or the ``.pt`` file with ``med_config.json`` beside it.


        ``tokenizer``: ``bert-base-uncased`` as BLIP uses (its two added tokens never occur in prompts).
        """
        from transformers import AutoTokenizer

        source = path_or_id or IMAGEREWARD_REPO
        weights = load_weights(resolve_file(source, "ImageReward.pt", "ImageReward"), "ImageReward")
        beside = str(Path(source).expanduser().parent) if Path(source).expanduser().is_file() else source
        med_config = read_json(resolve_file(beside, "med_config.json", "ImageReward"), what="ImageReward's BLIP config",
                               fix="pass an intact med_config.json beside the weights, or download it again")
        model = ImageRewardModel.from_published(weights, med_config)
        return cls(model, from_pretrained(AutoTokenizer, tokenizer, "ImageReward BERT tokenizer"), **kwargs)
