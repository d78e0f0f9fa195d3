"""FLUX.1 end to end on a tiny offline FluxPipeline: packed latents, T5 + CLIP pooled text, the guidance
embedding; every method trains, and its LoRA loads in stock diffusers."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sspo.errors import ModelError
from sspo.models.families import FAMILIES, family_of
from sspo.models.families.flux import pack_latents, unpack_latents
from sspo.models.pipeline import load_pipeline, load_pipeline_config
from sspo.training.trainer import Trainer, check_model_fits, model_files, train

from lora_checks import assert_lora_reloads_as_trained
from test_trainer import metrics, tiny_config
from tiny_pipelines import build_flux_pipeline

PROMPT = "a large red circle on the left, white background"
FLUX = ["negatives.scheduler=pipeline", "model.lora_targets=[to_q, to_k, to_v, to_out.0]"]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> str:
    return str(build_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipeline"))


def flux_config(out: Path, model: str, *overrides: str):
    return tiny_config(out, model, *FLUX, *overrides)


def test_flux_pipelines_are_their_family(tiny_flux, tmp_path):
    assert family_of(load_pipeline_config(tiny_flux)).name == "flux"
    pipe = load_pipeline(tiny_flux)
    family = family_of(pipe)
    assert type(pipe).__name__ == "FluxPipeline" and family.name == "flux" and family.default_guidance_scale == 3.5
    cond = family.encode_prompts([PROMPT, PROMPT], "cpu", 32)
    assert cond.embeds.shape[-1] == pipe.text_encoder_2.config.d_model  # T5's token embeddings
    assert cond.pooled.shape == (2, pipe.text_encoder.config.hidden_size)  # CLIP's pooled embedding
    schnell = build_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)
    assert family_of(load_pipeline_config(schnell)).name == "flux"


def test_predict_packs_and_unpacks_exactly_and_tells_the_transformer_sigma_and_guidance(tiny_flux):
    family = family_of(load_pipeline(tiny_flux))
    latents = torch.randn(2, 8, 6, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_latents(pack_latents(latents), 6, 4), latents)

    seen = {}

    def echo(hidden_states, **kwargs):  # a transformer that returns its packed input
        seen.update(kwargs, hidden_states=hidden_states)
        return (hidden_states,)

    cond = family.encode_prompts([PROMPT, PROMPT], "cpu", 32)
    timesteps = torch.tensor([250.0, 750.0])
    assert torch.equal(family.predict(echo, latents, timesteps, cond), latents)
    assert seen["hidden_states"].shape == (2, 3 * 2, 4 * 8)  # 2x2 patches of 8 channels
    assert seen["timestep"].tolist() == [0.25, 0.75]  # sigma, as FluxPipeline passes it
    assert seen["guidance"].tolist() == [3.5, 3.5]  # flow.guidance_scale's default, diffusers' FLUX scripts' too
    assert seen["img_ids"].shape == (6, 3) and seen["txt_ids"].shape == (cond.embeds.shape[1], 3)
    with pytest.raises(ModelError, match="2x2 patches.*multiple of"):
        family.predict(echo, torch.randn(2, 8, 5, 4), timesteps, cond)


def test_schnell_has_no_guidance_input(tmp_path):
    family = family_of(load_pipeline(build_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)))
    assert family.guidance(2, "cpu") is None


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_flow_guidance_scale_is_named_as_ignored_only_by_a_model_without_a_guidance_embedding(guidance_embeds, tmp_path, caplog):
    model = str(build_flux_pipeline(tmp_path / "flux", guidance_embeds=guidance_embeds))
    cfg = flux_config(tmp_path / "run", model, "flow.guidance_scale=9")
    with caplog.at_level("WARNING"):
        check_model_fits(cfg, model_files(cfg), warn=True)
    ignored = "ignored for this model: flow.guidance_scale (a guidance embedding's input, as FLUX.1-dev has; this flux model has none)"
    assert (ignored in caplog.text) != guidance_embeds


def test_negatives_are_the_stock_pipelines_samples_unpacked(tiny_flux):
    """Sampling is FluxPipeline's usual call (guidance embedding, no negative prompt): the same seed
    gives its latents, unpacked to (B, C, H, W)."""
    pipe = load_pipeline(tiny_flux)
    family = family_of(pipe)
    cond = family.encode_prompts([PROMPT], "cpu", 32)
    sampled = family.sample(pipe.transformer, family.sampler("pipeline", 0.0), cond, family.encode_unconditional("cpu", 32), [7],
                            steps=2, guidance_scale=3.5, latent_size=(8, 8), device="cpu")
    stock = pipe(PROMPT, num_inference_steps=2, guidance_scale=3.5, height=32, width=32, generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert sampled.shape == (1, 8, 8, 8)
    torch.testing.assert_close(sampled, unpack_latents(stock, 8, 8))


@pytest.mark.parametrize("method", ["sft", "dpo", "spin", "sspo"])
def test_every_method_trains_flux(method, tiny_flux, tmp_path):
    cfg = flux_config(tmp_path / method, tiny_flux, f"method={method}")
    final = train(cfg)
    rows = metrics(tmp_path / method)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (final / "pytorch_lora_weights.safetensors").is_file()


# Stock diffusers only, in a process of its own: FluxPipeline's samples before and after load_lora_weights.
STOCK_LOADING = r"""
import sys
import torch
from diffusers import FluxPipeline
from safetensors.torch import save_file

base, lora, out = sys.argv[1:]
pipe = FluxPipeline.from_pretrained(base)
pipe.set_progress_bar_config(disable=True)

def sample():
    with torch.no_grad():
        return pipe("a large red circle on the left, white background", num_inference_steps=2, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

before = sample()
pipe.load_lora_weights(lora)
assert not any(module == "sspo" or module.startswith("sspo.") for module in sys.modules)
save_file({"before": before, "after": sample()}, out)
"""


def test_the_lora_loads_in_stock_flux_pipeline_and_samples_as_trained(tiny_flux, tmp_path):
    # flux-lora.yaml's kinds of layers: attention projections (renamed in diffusers' UNet layout) and others
    targets = "model.lora_targets=[to_q, to_k, to_v, to_out.0, add_k_proj, to_add_out, ff.net.0.proj, proj_mlp]"
    trainer = Trainer(flux_config(tmp_path / "run", tiny_flux, "model.lora_rank=4", "model.lora_alpha=8", targets))
    final = trainer.train()
    assert f'DiffusionPipeline.from_pretrained("{tiny_flux}", dtype=dtype)' in (final / "README.md").read_text()
    assert_lora_reloads_as_trained(trainer, tiny_flux, final, PROMPT)

    out = tmp_path / "stock.safetensors"
    done = subprocess.run([sys.executable, "-c", STOCK_LOADING, tiny_flux, str(final), str(out)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    stock = load_file(out)
    assert not torch.allclose(stock["before"], stock["after"], atol=1e-3)


def test_full_fine_tuning_saves_a_pipeline_from_pretrained_loads(tiny_flux, tmp_path):
    from diffusers import FluxPipeline

    final = train(flux_config(tmp_path / "run", tiny_flux, "model.lora=false"))
    tuned, base = FluxPipeline.from_pretrained(str(final)), FluxPipeline.from_pretrained(tiny_flux)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.transformer.parameters(), base.transformer.parameters()))
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert family_of(load_pipeline(str(final))).name == "flux"


def test_the_cached_text_condition_is_t5s_and_clips(tiny_flux, tmp_path):
    """data.cache_latents stores FLUX's condition (T5 embeddings and CLIP pooled) and trains from it."""
    run = tmp_path / "run"
    train(flux_config(run, tiny_flux, "data.cache_latents=true", f"data.cache_dir={tmp_path / 'cache'}"))
    shard = load_file(str(next((tmp_path / "cache").glob("shard-*.safetensors"))))
    assert shard["embeds"].shape[-1] == 32 and shard["pooled"].ndim == 2 and "time_ids" not in shard
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(run))


def test_a_flux_family_needs_a_flux_transformer():
    flux = FAMILIES["flux"]
    assert not flux.detects({"transformer": ["diffusers", "SD3Transformer2DModel"], "text_encoder_3": ["transformers", "T5EncoderModel"]})
    assert not flux.detects({"unet": SimpleNamespace()})
