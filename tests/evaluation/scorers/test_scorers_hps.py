"""HPSv2: open_clip -> transformers key mapping, checked against an open_clip-style forward written here."""

import argparse
import re

import pytest
import torch
import torch.nn.functional as F

from sspo.errors import ModelError, SSPOError
from sspo.evaluation.scorers import build_scorer, hps
from sspo.evaluation.scorers.base import hf_from_state_dict, load_weights, rename_key
from sspo.evaluation.scorers.hps import openclip_to_hf
from sspo.evaluation.scorers.preprocess import LongestSideTransform

from scorer_models import HEADS, LAYERS, PATCH, PROMPTS, TEXT_WIDTH, VISION_WIDTH


def _block(x, sd, prefix, width, mask=None):
    """open_clip's ResidualAttentionBlock: nn.MultiheadAttention on packed in_proj weights, GELU MLP."""
    h = F.layer_norm(x, (width,), sd[prefix + "ln_1.weight"], sd[prefix + "ln_1.bias"]).transpose(0, 1)
    h, _ = F.multi_head_attention_forward(
        h, h, h, width, HEADS, sd[prefix + "attn.in_proj_weight"], sd[prefix + "attn.in_proj_bias"],
        None, None, False, 0.0, sd[prefix + "attn.out_proj.weight"], sd[prefix + "attn.out_proj.bias"],
        training=False, need_weights=False, attn_mask=mask,
    )
    x = x + h.transpose(0, 1)
    h = F.layer_norm(x, (width,), sd[prefix + "ln_2.weight"], sd[prefix + "ln_2.bias"])
    h = F.linear(F.gelu(F.linear(h, sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"])),
                 sd[prefix + "mlp.c_proj.weight"], sd[prefix + "mlp.c_proj.bias"])
    return x + h


def openclip_encode_text(sd, tokens, eos_id):
    length = tokens.shape[1]
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in range(LAYERS):
        x = _block(x, sd, f"transformer.resblocks.{i}.", TEXT_WIDTH, mask)
    x = F.layer_norm(x, (TEXT_WIDTH,), sd["ln_final.weight"], sd["ln_final.bias"])
    eot = (tokens == eos_id).int().argmax(-1)  # open_clip's argmax: the EOT id is the largest in its vocab
    return x[torch.arange(len(tokens)), eot] @ sd["text_projection"]


def openclip_encode_image(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (VISION_WIDTH,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(LAYERS):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}.", VISION_WIDTH)
    return F.layer_norm(x[:, 0], (VISION_WIDTH,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]


def hf_to_openclip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hps.openclip_to_hf`, from its tables: the mapping loses no key."""
    top = {v: k for k, v in hps._TOP.items()}
    towers = {v: k for k, v in hps._TOWERS.items()}
    block = {v: k for k, v in hps._BLOCK.items()}
    projections = {v: k for k, v in hps._PROJECTIONS.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key in projections:
            out[projections[key]] = value.t().contiguous()
            continue
        tower = next((t for t in towers if key.startswith(t)), None)
        if tower is None:
            new = rename_key(key, top)
            assert new is not None, f"not a CLIPModel key: {key}"
            out[new] = value
            continue
        index, rest = key[len(tower):].split(".", 1)
        prefix = f"{towers[tower]}{index}."
        match = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if match:
            qkv.setdefault(f"{prefix}attn.in_proj_{match[2]}", {})[match[1]] = value
            continue
        module, param = rest.rsplit(".", 1)
        out[f"{prefix}{block[module]}.{param}"] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def test_key_mapping_round_trips(hps_checkpoint):
    _, sd = hps_checkpoint
    converted = openclip_to_hf(sd)
    assert converted["text_projection.weight"].shape == (sd["text_projection"].shape[1], TEXT_WIDTH)
    assert "text_model.encoder.layers.1.self_attn.k_proj.bias" in converted
    back = hf_to_openclip(converted)
    assert set(back) == set(sd) - {"attn_mask"}
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_unknown_open_clip_key_is_a_clear_error(hps_checkpoint):
    _, sd = hps_checkpoint
    with pytest.raises(ModelError, match="visual.transformer.resblocks.0.ls_1.gamma"):
        openclip_to_hf({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(VISION_WIDTH)})


def test_converted_clipmodel_computes_the_open_clip_forward(hps_checkpoint, clip_processor_dir):
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    _, sd = hps_checkpoint
    model = hf_from_state_dict(CLIPModel, CLIPConfig.from_pretrained(clip_processor_dir), openclip_to_hf(sd), "tiny HPS")
    tokenizer = AutoTokenizer.from_pretrained(clip_processor_dir)
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_text = model.get_text_features(**tokens).pooler_output
        ours_image = model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(ours_text, openclip_encode_text(sd, tokens["input_ids"], tokenizer.eos_token_id), atol=1e-5)
    assert torch.allclose(ours_image, openclip_encode_image(sd, pixels), atol=1e-5)


def test_wrong_shapes_name_the_keys(hps_checkpoint, clip_processor_dir):
    from transformers import CLIPConfig, CLIPModel

    _, sd = hps_checkpoint
    converted = openclip_to_hf(sd)
    converted.pop("logit_scale")
    converted["text_projection.weight"] = torch.zeros(3, 3)
    with pytest.raises(ModelError, match="missing: logit_scale.*wrong shape: text_projection.weight"):
        hf_from_state_dict(CLIPModel, CLIPConfig.from_pretrained(clip_processor_dir), converted, "tiny HPS")


def test_hpsv2_scorer_is_100_times_open_clip_cosine(monkeypatch, hps_checkpoint, clip_processor_dir, shape_images):
    from transformers import AutoTokenizer

    try:
        import ftfy  # noqa: F401
    except ImportError:  # without the extra, still run the scorer: cleaning plain ASCII prompts is a no-op
        monkeypatch.setattr(hps, "openclip_clean", str.strip)

    path, sd = hps_checkpoint
    scorer = build_scorer("hpsv2", str(path), processor=str(clip_processor_dir), batch_size=1)
    scores = scorer.score(shape_images, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and scorer.name == "hpsv2"

    tokenizer = AutoTokenizer.from_pretrained(clip_processor_dir)
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    pixels = LongestSideTransform(size=32)(shape_images)
    expected = 100 * F.cosine_similarity(openclip_encode_image(sd, pixels), openclip_encode_text(sd, tokens, tokenizer.eos_token_id))
    assert torch.allclose(scores, expected, atol=1e-4)
    # the folder form finds the file by its published name; v2.1 looks for its own file
    assert torch.allclose(build_scorer("hpsv2", str(path.parent), processor=str(clip_processor_dir)).score(shape_images, PROMPTS), scores)
    with pytest.raises(ModelError, match="HPS_v2.1_compressed.pt"):
        build_scorer("hpsv21", str(path.parent), processor=str(clip_processor_dir))


def test_hps_prompts_are_cleaned_like_open_clip():
    pytest.importorskip("ftfy", reason="HPSv2 needs the scorers extra (ftfy)")
    from sspo.evaluation.scorers.hps import openclip_clean

    assert openclip_clean("  a  red &amp;amp; “blue”\n circle ") == 'a red & "blue" circle'


def test_missing_ftfy_names_the_extra(monkeypatch, hps_checkpoint, clip_processor_dir):
    monkeypatch.setitem(__import__("sys").modules, "ftfy", None)
    with pytest.raises(SSPOError, match=r"pip install 'sspo\[scorers\]'"):
        build_scorer("hpsv2", str(hps_checkpoint[0]), processor=str(clip_processor_dir))


def test_checkpoints_are_loaded_without_unpickling_code(tmp_path, hps_checkpoint):
    _, sd = hps_checkpoint
    pickled = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1.0)}, pickled)
    with pytest.raises(ModelError, match="cannot be loaded safely.*safetensors"):
        load_weights(pickled, "HPS")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "hps.safetensors"))
    assert set(load_weights(tmp_path / "hps.safetensors", "HPS")) == set(sd)
    module_prefixed = tmp_path / "dp.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, module_prefixed)
    assert set(load_weights(module_prefixed, "HPS")) == set(sd)
