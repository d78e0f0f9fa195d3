"""ImageReward: the published key layout mapped onto transformers' BLIP modules, and its normalisation."""

import json

import pytest
import torch
import torch.nn.functional as F

from sspo.errors import ModelError
from sspo.evaluation.scorers import build_scorer
from sspo.evaluation.scorers.imagereward import REWARD_MEAN, REWARD_STD, ImageRewardModel, imagereward_to_hf

from scorer_models import IR_PATCH, PROMPTS, tiny_imagereward_state_dict, tiny_med_config


def blip_vit_forward(sd, pixels, heads):
    """BLIP's timm-style ViT, written from the published keys (LayerNorm eps 1e-6, fused qkv)."""
    p = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=IR_PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(len(x), -1, -1), x], dim=1) + sd[p + "pos_embed"]
    b, n, d = x.shape
    for i in range(2):
        q = f"{p}blocks.{i}."
        h = F.layer_norm(x, (d,), sd[q + "norm1.weight"], sd[q + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[q + "attn.qkv.weight"], sd[q + "attn.qkv.bias"]).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (d // heads) ** -0.5).softmax(-1)
        x = x + F.linear((attn @ qkv[2]).transpose(1, 2).reshape(b, n, d), sd[q + "attn.proj.weight"], sd[q + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), sd[q + "norm2.weight"], sd[q + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[q + "mlp.fc1.weight"], sd[q + "mlp.fc1.bias"])), sd[q + "mlp.fc2.weight"], sd[q + "mlp.fc2.bias"])
    return F.layer_norm(x, (d,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)


@pytest.fixture(scope="module")
def published():
    return tiny_imagereward_state_dict()


def test_every_published_key_is_used_or_known_unused(published):
    parts = imagereward_to_hf(published)
    used = sum(len(part) for part in parts.values())
    unused = [k for k in published if k.startswith(("blip.vision_proj.", "blip.text_proj.")) or k.endswith("position_ids")]
    assert used + len(unused) == len(published)
    assert "encoder.layers.1.self_attn.qkv.weight" in parts["vision"] and "post_layernorm.bias" in parts["vision"]
    assert "encoder.layer.0.crossattention.self.key.weight" in parts["text"]
    with pytest.raises(ModelError, match="blip.itm_head.weight"):
        imagereward_to_hf({**published, "blip.itm_head.weight": torch.zeros(2, 2)})


def test_image_encoder_matches_blip_vit(published):
    model = ImageRewardModel.from_published(published, tiny_med_config())
    assert model.vision.config.layer_norm_eps == 1e-6 and model.vision.config.image_size == 32
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.vision(pixel_values=pixels).last_hidden_state
    assert torch.allclose(ours, blip_vit_forward(published, pixels, heads=model.vision.config.num_attention_heads), atol=1e-5)


def test_text_encoder_is_bidirectional_and_reads_the_image(published, bert_tokenizer_dir):
    from transformers import AutoTokenizer

    model = ImageRewardModel.from_published(published, tiny_med_config())
    tokens = AutoTokenizer.from_pretrained(bert_tokenizer_dir)(
        ["a red circle", "a red square"], padding="max_length", max_length=8, return_tensors="pt"
    )
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rewards = model(images[:1].expand(2, -1, -1, -1), tokens["input_ids"], tokens["attention_mask"])
        other_image = model(images[1:].expand(2, -1, -1, -1), tokens["input_ids"], tokens["attention_mask"])
    assert rewards[0] != rewards[1]  # [CLS] sees a later word: not a causal mask
    assert not torch.allclose(rewards, other_image)  # cross attention to the image tokens


def test_reward_normalisation_by_hand(imagereward_dir, bert_tokenizer_dir, shape_images):
    scorer = build_scorer("imagereward", str(imagereward_dir), tokenizer=str(bert_tokenizer_dir))
    head = scorer.model.mlp.layers
    for layer in (head[0], head[2], head[4], head[6], head[7]):
        layer.weight.data.zero_()
        layer.bias.data.zero_()
    head[7].bias.data.fill_(1.5)  # the raw head output is then 1.5 for every input
    scores = scorer.score(shape_images, PROMPTS)
    assert scores.tolist() == pytest.approx([(1.5 - 0.16717362830052426) / 1.0333394966054072] * 2, abs=1e-6)
    assert (REWARD_MEAN, REWARD_STD) == (0.16717362830052426, 1.0333394966054072)


def test_imagereward_scorer_end_to_end(imagereward_dir, bert_tokenizer_dir, shape_images):
    batch1 = build_scorer("imagereward", str(imagereward_dir), tokenizer=str(bert_tokenizer_dir), batch_size=1)
    scores = batch1.score(shape_images, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]
    batch2 = build_scorer("imagereward", str(imagereward_dir / "ImageReward.pt"), tokenizer=str(bert_tokenizer_dir), batch_size=2)
    assert torch.allclose(batch2.score(shape_images, PROMPTS), scores, atol=1e-5)


def test_med_config_must_match_the_weights(tmp_path, published, bert_tokenizer_dir):
    med = {**tiny_med_config(), "hidden_size": 48}
    torch.save(published, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    with pytest.raises(ModelError, match="text encoder.*wrong shape"):
        build_scorer("imagereward", str(tmp_path), tokenizer=str(bert_tokenizer_dir))
    (tmp_path / "med_config.json").unlink()
    with pytest.raises(ModelError, match="med_config.json"):
        build_scorer("imagereward", str(tmp_path), tokenizer=str(bert_tokenizer_dir))
