"""Tiny, randomly initialised scorer models of the published classes and formats, built offline (fixtures in conftest)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sspo.worlds.shapes import world as shapes

TEXT_WIDTH, VISION_WIDTH, EMBED, LAYERS, HEADS = 32, 48, 16, 2, 4
IMAGE, PATCH, CONTEXT = 32, 8, 16
PROMPTS = ["a large red circle on the left, white background", "a small blue square at the top, black background"]


def _tokenizer_words() -> list[str]:
    return shapes.vocabulary()


@pytest.fixture(scope="session")
def clip_processor_dir(tmp_path_factory):
    """A CLIP-H-processor-like folder: word-level CLIP tokenizer, preprocessor_config.json, config.json."""
    from transformers import CLIPConfig

    from sspo.models.tiny import write_word_tokenizer

    folder = tmp_path_factory.mktemp("clip_processor")
    tokenizer = write_word_tokenizer(folder, _tokenizer_words(), max_length=CONTEXT)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=CONTEXT,
            hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=VISION_WIDTH, intermediate_size=4 * VISION_WIDTH, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH, hidden_act="gelu",
        ),
        projection_dim=EMBED,
    )
    config.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": IMAGE},
        "crop_size": {"height": IMAGE, "width": IMAGE},
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
    }))
    return folder


@pytest.fixture(scope="session")
def clip_model_dir(tmp_path_factory, clip_processor_dir):
    """A tiny random transformers CLIPModel saved with save_pretrained (PickScore_v1's format)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig.from_pretrained(clip_processor_dir))
    folder = tmp_path_factory.mktemp("clip_model")
    model.save_pretrained(folder)
    return folder


def _linear(gen, out_features, in_features, scale=None):
    scale = scale or 1 / math.sqrt(in_features)
    return torch.randn(out_features, in_features, generator=gen) * scale, torch.randn(out_features, generator=gen) * 0.02


def _layer_norm(gen, width):
    return 1 + 0.1 * torch.randn(width, generator=gen), 0.1 * torch.randn(width, generator=gen)


def openclip_block(gen, prefix: str, width: int) -> dict[str, torch.Tensor]:
    sd = {}
    sd[f"{prefix}ln_1.weight"], sd[f"{prefix}ln_1.bias"] = _layer_norm(gen, width)
    sd[f"{prefix}attn.in_proj_weight"], _ = _linear(gen, 3 * width, width)
    sd[f"{prefix}attn.in_proj_bias"] = 0.02 * torch.randn(3 * width, generator=gen)
    sd[f"{prefix}attn.out_proj.weight"], sd[f"{prefix}attn.out_proj.bias"] = _linear(gen, width, width)
    sd[f"{prefix}ln_2.weight"], sd[f"{prefix}ln_2.bias"] = _layer_norm(gen, width)
    sd[f"{prefix}mlp.c_fc.weight"], sd[f"{prefix}mlp.c_fc.bias"] = _linear(gen, 4 * width, width)
    sd[f"{prefix}mlp.c_proj.weight"], sd[f"{prefix}mlp.c_proj.bias"] = _linear(gen, width, 4 * width)
    return sd


def tiny_openclip_state_dict(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An open_clip ViT CLIP state dict written key by key, as in HPS_v2_compressed.pt's "state_dict"."""
    gen = torch.Generator().manual_seed(seed)
    sd = {
        "positional_embedding": 0.1 * torch.randn(CONTEXT, TEXT_WIDTH, generator=gen),
        "text_projection": torch.randn(TEXT_WIDTH, EMBED, generator=gen) / math.sqrt(TEXT_WIDTH),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "token_embedding.weight": 0.1 * torch.randn(vocab_size, TEXT_WIDTH, generator=gen),
        "attn_mask": torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1),
        "visual.class_embedding": 0.1 * torch.randn(VISION_WIDTH, generator=gen),
        "visual.positional_embedding": 0.1 * torch.randn((IMAGE // PATCH) ** 2 + 1, VISION_WIDTH, generator=gen),
        "visual.proj": torch.randn(VISION_WIDTH, EMBED, generator=gen) / math.sqrt(VISION_WIDTH),
        "visual.conv1.weight": torch.randn(VISION_WIDTH, 3, PATCH, PATCH, generator=gen) / math.sqrt(3 * PATCH * PATCH),
    }
    sd["ln_final.weight"], sd["ln_final.bias"] = _layer_norm(gen, TEXT_WIDTH)
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = _layer_norm(gen, VISION_WIDTH)
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = _layer_norm(gen, VISION_WIDTH)
    for i in range(LAYERS):
        sd.update(openclip_block(gen, f"transformer.resblocks.{i}.", TEXT_WIDTH))
        sd.update(openclip_block(gen, f"visual.transformer.resblocks.{i}.", VISION_WIDTH))
    return sd


@pytest.fixture(scope="session")
def hps_checkpoint(tmp_path_factory, clip_processor_dir):
    """``HPS_v2_compressed.pt``-format file: ``{"state_dict": open_clip state dict}``, plus that dict."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(clip_processor_dir))
    sd = tiny_openclip_state_dict(vocab)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2_compressed.pt"
    torch.save({"state_dict": sd}, path)
    return path, sd


# ImageReward: BLIP ViT (width 32, 16 patches) + BERT with cross attention (width 24) + the MLP head.
IR_VISION, IR_TEXT, IR_IMAGE, IR_PATCH = 32, 24, 32, 8
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_tokenizer_words()]


def tiny_med_config() -> dict:
    return {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": IR_TEXT, "initializer_range": 0.02,
        "intermediate_size": 4 * IR_TEXT, "layer_norm_eps": 1e-12, "max_position_embeddings": 40,
        "model_type": "bert", "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 0,
        "type_vocab_size": 2, "vocab_size": len(BERT_WORDS) + 2, "encoder_width": 768, "add_cross_attention": True,
    }


def tiny_imagereward_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """``ImageReward.pt``'s key layout (BLIP_Pretrain under ``blip.``, the head under ``mlp.``), written by hand."""
    gen = torch.Generator().manual_seed(seed)
    med = tiny_med_config()
    v, t = IR_VISION, IR_TEXT
    sd = {
        "blip.visual_encoder.cls_token": 0.1 * torch.randn(1, 1, v, generator=gen),
        "blip.visual_encoder.pos_embed": 0.1 * torch.randn(1, (IR_IMAGE // IR_PATCH) ** 2 + 1, v, generator=gen),
    }
    sd["blip.visual_encoder.patch_embed.proj.weight"] = torch.randn(v, 3, IR_PATCH, IR_PATCH, generator=gen) / IR_PATCH
    sd["blip.visual_encoder.patch_embed.proj.bias"] = 0.02 * torch.randn(v, generator=gen)
    for i in range(2):
        p = f"blip.visual_encoder.blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = _layer_norm(gen, v)
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = _linear(gen, 3 * v, v)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = _linear(gen, v, v)
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = _layer_norm(gen, v)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = _linear(gen, 4 * v, v)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = _linear(gen, v, 4 * v)
    sd["blip.visual_encoder.norm.weight"], sd["blip.visual_encoder.norm.bias"] = _layer_norm(gen, v)
    e = "blip.text_encoder."
    sd[e + "embeddings.word_embeddings.weight"] = 0.1 * torch.randn(med["vocab_size"], t, generator=gen)
    sd[e + "embeddings.position_embeddings.weight"] = 0.1 * torch.randn(med["max_position_embeddings"], t, generator=gen)
    sd[e + "embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    sd[e + "embeddings.LayerNorm.weight"], sd[e + "embeddings.LayerNorm.bias"] = _layer_norm(gen, t)
    for i in range(med["num_hidden_layers"]):
        p = f"{e}encoder.layer.{i}."
        for attn, kv_width in (("attention", t), ("crossattention", v)):
            sd[f"{p}{attn}.self.query.weight"], sd[f"{p}{attn}.self.query.bias"] = _linear(gen, t, t)
            sd[f"{p}{attn}.self.key.weight"], sd[f"{p}{attn}.self.key.bias"] = _linear(gen, t, kv_width)
            sd[f"{p}{attn}.self.value.weight"], sd[f"{p}{attn}.self.value.bias"] = _linear(gen, t, kv_width)
            sd[f"{p}{attn}.output.dense.weight"], sd[f"{p}{attn}.output.dense.bias"] = _linear(gen, t, t)
            sd[f"{p}{attn}.output.LayerNorm.weight"], sd[f"{p}{attn}.output.LayerNorm.bias"] = _layer_norm(gen, t)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = _linear(gen, 4 * t, t)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = _linear(gen, t, 4 * t)
        sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"] = _layer_norm(gen, t)
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = _linear(gen, 8, v)
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = _linear(gen, 8, t)
    sd.update(linear_mlp_state_dict(gen, t, prefix="mlp."))
    return sd


def linear_mlp_state_dict(gen, input_size: int, prefix: str = "") -> dict[str, torch.Tensor]:
    sd = {}
    for index, (out_f, in_f) in zip((0, 2, 4, 6, 7), ((1024, input_size), (128, 1024), (64, 128), (16, 64), (1, 16))):
        sd[f"{prefix}layers.{index}.weight"], sd[f"{prefix}layers.{index}.bias"] = _linear(gen, out_f, in_f)
    return sd


@pytest.fixture(scope="session")
def bert_tokenizer_dir(tmp_path_factory):
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("bert")
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def imagereward_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward")
    torch.save(tiny_imagereward_state_dict(), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(tiny_med_config()))
    return folder


@pytest.fixture(scope="session")
def shape_images():
    """Clean renders of the two PROMPTS (32x32, shapes world)."""
    return [shapes.render(shapes.parse_prompt(p)) for p in PROMPTS]
