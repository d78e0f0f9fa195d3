"""Model families: a pipeline maps to its family, and a family registered here trains through every method."""

import functools
import math

import pytest
import torch
from diffusers import DDPMScheduler

from sspo.errors import ConfigError, ModelError
from sspo.models.condition import TextCondition
from sspo.models.families import FAMILIES, family_of, register
from sspo.models.families.sd import StableDiffusion
from sspo.models.pipeline import load_pipeline
from sspo.training.config import ModelConfig
from sspo.training.trainer import train

from test_trainer import metrics, tiny_config


class UpperQuarterDDPM(StableDiffusion):
    """A throw-away family: plain epsilon-prediction DDPM (whatever the pipeline's prediction type)
    that trains on the noisiest quarter of the schedule only, and records every t its denoiser sees."""

    name = "test-upper-quarter-ddpm"
    seen: list[torch.Tensor] = []

    @functools.cached_property
    def noise_schedule(self):
        return DDPMScheduler.from_config(self.component("scheduler").config, prediction_type="epsilon")

    def draw_timesteps(self, size, generator):
        steps = self.noise_schedule.config.num_train_timesteps
        return torch.randint(steps - steps // 4, steps, tuple(size), generator=generator)

    def denoising_errors(self, denoiser, latents, noise, timesteps, cond):
        self.seen.append(timesteps.cpu())
        return super().denoising_errors(denoiser, latents, noise, timesteps, cond)


@pytest.fixture
def upper_quarter():
    register(UpperQuarterDDPM)
    UpperQuarterDDPM.seen.clear()
    yield UpperQuarterDDPM
    del FAMILIES[UpperQuarterDDPM.name]


@pytest.mark.parametrize("method", ["sft", "dpo", "spin", "sspo"])
def test_a_registered_family_trains_every_method_with_its_own_timesteps(method, upper_quarter, quick_base, tmp_path):
    cfg = tiny_config(tmp_path / "run", quick_base, f"method={method}", f"model.family={upper_quarter.name}", "iterations=1", "steps_per_iteration=2", "optim.batch_size=2")
    final = train(cfg)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    seen = torch.cat(upper_quarter.seen)
    # Policy (and reference) forwards of 2 steps x 2 pairs; uniform draws over [0, 1000) would land
    # below 750 in three of four.
    assert len(seen) >= 4 and bool((seen >= 750).all()) and bool((seen < 1000).all())


def test_auto_detects_each_family_from_the_pipeline_components():
    scheduler = DDPMScheduler()

    def named(name):  # a loaded component: detection reads its class name, as diffusers names it
        return type(name, (), {})()

    unet, clip, clip_projected = named("UNet2DConditionModel"), named("CLIPTextModel"), named("CLIPTextModelWithProjection")
    assert family_of({"unet": unet, "text_encoder": clip, "scheduler": scheduler}).name == "sd"
    assert family_of({"unet": unet, "text_encoder": clip, "text_encoder_2": clip_projected, "scheduler": scheduler}).name == "sdxl"
    assert family_of({"unet": named("UNetMotionModel"), "scheduler": scheduler}).name == "animatediff"
    assert family_of({"unet": unet, "text_encoder": clip, "motion_adapter": object(), "scheduler": scheduler}).name == "animatediff"
    assert family_of({"transformer": ["diffusers", "SD3Transformer2DModel"], "text_encoder_3": [None, None]}).name == "sd3"
    assert family_of({"transformer": ["diffusers", "FluxTransformer2DModel"], "text_encoder": []}).name == "flux"
    with pytest.raises(ModelError, match="no known model family"):
        family_of({"transformer": object(), "scheduler": scheduler})
    compiled = torch.compile(type("UNet2DConditionModel", (torch.nn.Module,), {})())  # the wrapper's class is OptimizedModule
    assert family_of({"unet": compiled, "text_encoder": clip, "scheduler": scheduler}).name == "sd"


@pytest.mark.parametrize("index", [
    {"_class_name": "KolorsPipeline", "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["kolors", "ChatGLMModel"]},  # SD's layout
    {"_class_name": "HiDreamImagePipeline", "transformer": ["diffusers", "HiDreamImageTransformer2DModel"], "text_encoder_3": ["transformers", "T5EncoderModel"]},
    {"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"], "text_encoder": ["transformers", "Gemma2Model"]},
], ids=["kolors", "hidream", "sana"])
def test_a_pipeline_laid_out_as_a_family_but_of_other_models_is_no_family(index):
    with pytest.raises(ModelError, match=rf"^{index['_class_name']} is of no known model family; sspo trains "):
        family_of(index)


def test_a_named_family_must_fit_the_pipelines_components():
    sd = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], "vae": [], "text_encoder": ["transformers", "CLIPTextModel"],
          "scheduler": DDPMScheduler()}
    assert family_of(sd, "sd").name == "sd"
    with pytest.raises(ModelError, match=r"model.family 'sdxl' does not fit this StableDiffusionPipeline: it has no text_encoder_2; set model.family to auto"):
        family_of(sd, "sdxl")
    with pytest.raises(ModelError, match=r"model.family 'flux' does not fit this StableDiffusionPipeline: it has no transformer, text_encoder_2"):
        family_of(sd, "flux")
    sd3 = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": [], "text_encoder": [],
           "text_encoder_2": [], "text_encoder_3": [], "tokenizer": [], "tokenizer_2": [], "tokenizer_3": [], "scheduler": []}
    with pytest.raises(ModelError, match=r"^model.family 'flux' does not fit this StableDiffusion3Pipeline, which is sd3's; set model.family to auto \(or sd3\)$"):
        family_of(sd3, "flux")  # every component FLUX has is there: its encode_prompt would fail inside the run


def test_model_family_accepts_registered_names_only(upper_quarter):
    assert ModelConfig(family=upper_quarter.name).family == upper_quarter.name
    assert ModelConfig(family="auto").family == "auto"
    with pytest.raises(ConfigError, match="model.family.*expected one of 'auto', .*'sd', "):
        ModelConfig(family="kandinsky")


@pytest.mark.parametrize("kind, scheduler, solver", [
    ("dpm++", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True}),
    ("unipc", "UniPCMultistepScheduler", {"solver_order": 2, "lower_order_final": True}),
])
def test_the_few_step_solvers_sample_the_quick_base_on_its_own_noise_schedule(kind, scheduler, solver, quick_base):
    pipe = load_pipeline(quick_base)
    family = family_of(pipe)
    sampler = family.sampler(kind, 0.0)
    config = sampler.scheduler.config
    assert type(sampler.scheduler).__name__ == scheduler and {key: config[key] for key in solver} == solver
    for key in ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing", "beta_schedule"):  # the pipeline's schedule, not the solver's defaults
        assert config[key] == pipe.scheduler.config[key]
    cond, uncond = family.encode_prompts(["a red circle", "a blue square"], "cpu"), family.encode_unconditional("cpu")
    size = (pipe.unet.config.sample_size,) * 2

    def sample(seeds):
        return family.sample(pipe.unet, sampler, cond, uncond, seeds, steps=4, guidance_scale=5.0, latent_size=size, device="cpu")

    first = sample([0, 1])
    assert first.shape == (2, pipe.unet.config.in_channels, *size) and bool(torch.isfinite(first).all())
    assert torch.equal(first, sample([0, 1])) and not torch.equal(first[0], sample([2, 1])[0])


def test_each_family_takes_the_image_sides_its_denoiser_can():
    sd3 = family_of({"transformer": ["diffusers", "SD3Transformer2DModel"], "text_encoder_3": [], "vae": [], "text_encoder": [], "text_encoder_2": []})
    flux = family_of({"transformer": ["diffusers", "FluxTransformer2DModel"], "vae": [], "text_encoder": [], "text_encoder_2": []})
    sd = family_of({"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": DDPMScheduler()})
    assert sd3.image_sides({"patch_size": 2, "pos_embed_max_size": 96}, 8) == (16, 1536)  # SD3's transformer, its VAE's 8
    assert flux.image_sides({"patch_size": 1}, 8) == (16, None)  # 2x2 patches packed outside the transformer
    assert sd.image_sides({}, 8) == sd.image_sides({}, 4) == (8, None)  # SD's pipelines take multiples of 8, whatever the VAE
    sd3.check_image_sizes({"patch_size": 2, "pos_embed_max_size": 96}, 8, [(1024, 1536)], "data.resolution")
    with pytest.raises(ModelError, match=r"^data.resolution: sd3 takes image sides that are multiples of 16 px .*not 24x24; set data.resolution to a multiple of 16$"):
        sd3.check_image_sizes({"patch_size": 2, "pos_embed_max_size": 96}, 8, [(24, 24)], "data.resolution")
    with pytest.raises(ModelError, match=r"^--resolution: sd3's position embedding covers image sides up to 1536 px, not 2048x1024"):
        sd3.check_image_sizes({"patch_size": 2, "pos_embed_max_size": 96}, 8, [(2048, 1024)], "--resolution")
    with pytest.raises(ModelError, match=r"^data.resolution: flux takes image sides that are multiples of 16 px"):
        flux.check_image_sizes({}, 8, [(512, 520)], "data.resolution")


def test_a_prediction_of_another_shape_than_the_target_is_refused_not_broadcast():
    family = family_of({"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": DDPMScheduler()})
    latents = torch.zeros(2, 4, 8, 8)

    def one_channel(sample, timestep, encoder_hidden_states):  # (2, 1, 8, 8) would broadcast against the noise
        return type("Output", (), {"sample": sample[:, :1]})()

    with pytest.raises(ModelError, match=r"^StableDiffusion.predict gave \(2, 1, 8, 8\) for a target of \(2, 4, 8, 8\); "):
        family.denoising_errors(one_channel, latents, torch.ones_like(latents), torch.tensor([10, 20]), TextCondition(torch.zeros(2, 3, 5)))
