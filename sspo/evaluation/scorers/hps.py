"""HPSv2 / HPSv2.1: an open_clip ViT-H-14 checkpoint converted into transformers' ``CLIPModel``.

The published checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt`` in hub repo
``xswu/HPSv2``) hold ``{"state_dict": <open_clip CLIP state dict>}``. Both towers are in it, so only
the architecture (``config.json``) and the BPE tokenizer come from the CLIP-H processor id, whose
tokenizer files ship complete (the ``hpsv2`` wheel lacks its vocabulary file).
"""

from __future__ import annotations

import html
import re

import torch

from sspo.errors import ModelError
from sspo.evaluation.scorers.base import from_pretrained, hf_from_state_dict, load_weights, rename_key, require, resolve_file
from sspo.evaluation.scorers.clip import CLIP_H_PROCESSOR, ClipEmbedder, ClipScorer
from sspo.evaluation.scorers.preprocess import LongestSideTransform

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv21": "HPS_v2.1_compressed.pt"}

# open_clip name -> transformers name, for whole keys or key prefixes ending in ".".
_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.": "text_model.final_layer_norm.",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.": "vision_model.pre_layrnorm.",
    "visual.ln_post.": "vision_model.post_layernorm.",
}
# open_clip multiplies by these ([width, embed]); nn.Linear stores the transpose.
_PROJECTIONS = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_TOWERS = {
    "transformer.resblocks.": "text_model.encoder.layers.",
    "visual.transformer.resblocks.": "vision_model.encoder.layers.",
}
# Inside a residual block; attn.in_proj_{weight,bias} (q, k, v stacked) are split separately.
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_IGNORED = re.compile(r"(^|\.)attn_mask$")  # the causal-mask buffer older open_clip versions saved


def openclip_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an open_clip ``CLIP`` state dict (non-custom-text towers) to ``CLIPModel`` keys."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if _IGNORED.search(key):
            continue
        if key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = value.t().contiguous()
            continue
        tower = next((t for t in _TOWERS if key.startswith(t)), None)
        if tower is None:
            new = rename_key(key, _TOP)
            if new is None:
                unknown.append(key)
            else:
                out[new] = value
            continue
        index, rest = key[len(tower):].split(".", 1)
        prefix = f"{_TOWERS[tower]}{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
            continue
        module, param = rest.rsplit(".", 1)
        if module not in _BLOCK:
            unknown.append(key)
            continue
        out[f"{prefix}{_BLOCK[module]}.{param}"] = value
    if unknown:
        raise ModelError(
            "not an open_clip ViT CLIP state dict; unknown keys: " + ", ".join(unknown[:6])
            + (f" (+{len(unknown) - 6} more)" if len(unknown) > 6 else "")
        )
    return out


def openclip_clean(text: str) -> str:
    """open_clip's tokenizer text cleaning (ftfy, HTML unescape, whitespace), which HF's CLIP tokenizer skips."""
    ftfy = require("ftfy", "scorers", "HPSv2 (which cleans prompts with ftfy, as open_clip does)")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class HPSv2Scorer(ClipScorer):
    """HPSv2 / v2.1: ``100 * cos(image, text)`` (``hpsv2.score`` returns the plain cosine; papers report x100)."""

    name = "hpsv2"

    def _score_batch(self, images, prompts):
        return 100 * self.cosine(images, prompts)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | None = None,
        *,
        version: str = "hpsv2",
        processor: str = CLIP_H_PROCESSOR,
        antialias: bool = True,
        **kwargs,
    ) -> HPSv2Scorer:
        """``path_or_id``: the checkpoint file, a folder or hub repo holding it (default ``xswu/HPSv2``).

        ``processor``: where ``config.json`` (the ViT-H-14 architecture) and the tokenizer come from.
        ``antialias``: the ``hpsv2`` package resizes with whatever torchvision is installed, which
        antialiases since 0.17 (default here); ``False`` reproduces installs with an older one.
        """
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        if version not in HPS_FILES:
            raise ModelError(f"unknown HPS version {version!r}; expected one of {', '.join(HPS_FILES)}")
        clean = openclip_clean
        clean("")  # fail on a missing ftfy before downloading gigabytes
        what = f"{version} checkpoint"
        weights = load_weights(resolve_file(path_or_id or HPS_REPO, HPS_FILES[version], what), what)
        config = from_pretrained(CLIPConfig, processor, "CLIP-H config")
        model = hf_from_state_dict(CLIPModel, config, openclip_to_hf(weights), what)
        tokenizer = from_pretrained(AutoTokenizer, processor, "CLIP-H tokenizer")
        transform = LongestSideTransform(size=config.vision_config.image_size, antialias=antialias)
        scorer = cls(ClipEmbedder(model, tokenizer, transform, clean_text=clean), **kwargs)
        scorer.name = version
        return scorer
