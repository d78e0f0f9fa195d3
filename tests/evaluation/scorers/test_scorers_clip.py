"""PickScore, CLIP score and LAION aesthetic on a tiny random CLIPModel: the score formulas by hand."""

import math

import torch
import torch.nn.functional as F

from sspo.evaluation.scorers import build_scorer
from sspo.evaluation.scorers.preprocess import ClipTransform

from scorer_models import EMBED, PROMPTS, linear_mlp_state_dict


def _image_embeddings(model, images, crop_rounding="floor"):
    pixels = ClipTransform(size=32, crop_size=32, crop_rounding=crop_rounding)(images)
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixels).pooler_output


def _embeddings(model, tokenizer_dir, images):
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(tokenizer_dir)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return _image_embeddings(model, images), model.get_text_features(**tokens).pooler_output


def test_pickscore_is_exp_logit_scale_times_cosine(clip_model_dir, clip_processor_dir, shape_images):
    scorer = build_scorer("pickscore", str(clip_model_dir), processor=str(clip_processor_dir))
    scorer.clip.model.logit_scale.data.fill_(math.log(50.0))
    scores = scorer.score(shape_images, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    image, text = _embeddings(scorer.clip.model, clip_processor_dir, shape_images)
    assert torch.allclose(scores, 50.0 * F.cosine_similarity(image, text), atol=1e-5)


def test_batching_does_not_change_scores(clip_model_dir, clip_processor_dir, shape_images):
    images, prompts = shape_images * 3, PROMPTS * 3
    one = build_scorer("pickscore", str(clip_model_dir), processor=str(clip_processor_dir), batch_size=1)
    many = build_scorer("pickscore", str(clip_model_dir), processor=str(clip_processor_dir), batch_size=4)
    assert torch.allclose(one.score(images, prompts), many.score(images, prompts), atol=1e-5)


def test_clip_score_is_clamped_100_cosine(clip_model_dir, clip_processor_dir, shape_images):
    scorer = build_scorer("clip", str(clip_model_dir), processor=str(clip_processor_dir))
    image, text = _embeddings(scorer.clip.model, clip_processor_dir, shape_images)
    expected = (100 * F.cosine_similarity(image, text)).clamp(min=0)
    assert torch.allclose(scorer.score(shape_images, PROMPTS), expected, atol=1e-4)


def test_aesthetic_is_the_linear_head_on_the_normalised_image_embedding(tmp_path, clip_model_dir, shape_images):
    head = linear_mlp_state_dict(torch.Generator().manual_seed(3), EMBED)
    torch.save(head, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    scorer = build_scorer("aesthetic", str(tmp_path), clip_model=str(clip_model_dir))
    scores = scorer.score(shape_images, ["ignored", "ignored"])

    image = _image_embeddings(scorer.clip.model, shape_images, crop_rounding="round")
    x = image / image.norm(dim=-1, keepdim=True)
    for index in (0, 2, 4, 6, 7):  # dropouts at 1, 3, 5 are inactive; no activations anywhere
        x = x @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
    assert torch.allclose(scores, x.squeeze(-1), atol=1e-5)
    # the file itself works as well as its folder
    same = build_scorer("aesthetic", str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), clip_model=str(clip_model_dir))
    assert torch.allclose(same.score(shape_images, PROMPTS), scores)


def test_half_precision_scores_come_back_float32(clip_model_dir, clip_processor_dir, shape_images):
    scorer = build_scorer("pickscore", str(clip_model_dir), processor=str(clip_processor_dir), dtype=torch.bfloat16)
    full = build_scorer("pickscore", str(clip_model_dir), processor=str(clip_processor_dir))
    scores = scorer.score(shape_images, PROMPTS)
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, full.score(shape_images, PROMPTS), atol=1.0)  # logit scale 1/0.07 amplifies bf16 error
