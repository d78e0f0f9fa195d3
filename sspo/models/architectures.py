"""SD-1.5, SDXL, SD3.5-medium, FLUX.1-dev and PixArt-Sigma architectures with random weights:
their real topologies, for ``sspo bench`` and tests.

``small=True`` keeps each topology with tiny widths, so tests run them on a CPU in seconds.

The T5-XXL of the flow models and PixArt is replaced by a stand-in: one T5 encoder layer of
T5-XXL's widths (so its token embeddings are 4096 wide, as the transformers expect) over the world's
word vocabulary; the pipelines still pad its tokens to their lengths (SD3 256, FLUX 512, PixArt-Sigma
300). The denoisers, VAEs and CLIP encoders are full size. ``sspo-arch.json`` in the built folder says so.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from sspo.config import one_of
from sspo.io import atomic_write_json
from sspo.models.tiny import scheduler_for as sd15_scheduler
from sspo.models.tiny import write_t5_tokenizer, write_word_tokenizer
from sspo.paths import build_lock, cache_root

ARCH_MODELS = ("sd15", "sdxl", "sd35m", "flux", "pixart")
ARCH_TITLES = {"sd15": "SD-1.5", "sdxl": "SDXL", "sd35m": "SD3.5-medium", "flux": "FLUX.1-dev", "pixart": "PixArt-Sigma"}
FLOW_MODELS = ("sd35m", "flux")  # flow-matching transformers, saved in bf16 (the others in fp16)
T5_MODELS = (*FLOW_MODELS, "pixart")  # conditioned on T5-XXL's token embeddings (a stand-in here)
ARCH_VERSION = 1  # bump when a built folder's contents change, so cached folders are rebuilt
METADATA = "sspo-arch.json"
T5_STAND_IN = ("T5 stand-in: one T5 encoder layer of T5-XXL's widths (d_model 4096, d_ff 10240, 64 heads) over the world's words, "
               "instead of T5-XXL's 24 layers; its tokens are padded to the pipeline's length (SD3 256, FLUX 512, PixArt-Sigma 300)")


def _unet_kwargs(name: str, small: bool) -> dict:
    """``UNet2DConditionModel`` arguments of SD-1.5 / SDXL (``small``: same topology, tiny widths; tests)."""
    if name == "sd15":
        return dict(
            sample_size=8 if small else 64, in_channels=4, out_channels=4, layers_per_block=1 if small else 2,
            block_out_channels=(32, 32, 64, 64) if small else (320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32 if small else 768, attention_head_dim=8, norm_num_groups=8 if small else 32,
        )
    return dict(  # SDXL base 1.0
        sample_size=8 if small else 128, in_channels=4, out_channels=4, layers_per_block=1 if small else 2,
        block_out_channels=(40, 80, 160) if small else (320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2) if small else (1, 2, 10),
        attention_head_dim=(5, 10, 20), use_linear_projection=True, norm_num_groups=8 if small else 32,
        cross_attention_dim=64 if small else 2048,  # text_encoder + text_encoder_2 hidden sizes
        addition_embed_type="text_time", addition_time_embed_dim=8 if small else 256,
        projection_class_embeddings_input_dim=32 + 6 * 8 if small else 1280 + 6 * 256,  # pooled + 6 time ids
    )


def _text_kwargs(kind: str, small: bool) -> dict:
    """CLIP text encoders: ``clip-l`` (SD-1.5, SDXL's first), ``clip-bigg`` (SDXL's second)."""
    if kind == "clip-l":
        sizes = (32, 2, 2, 32) if small else (768, 12, 12, 768)
        act = "quick_gelu"
    else:
        sizes = (32, 2, 2, 32) if small else (1280, 32, 20, 1280)
        act = "gelu"
    hidden, layers, heads, projection = sizes
    return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                projection_dim=projection, hidden_act=act, max_position_embeddings=77, vocab_size=49408)


def _vae_kwargs(name: str, small: bool) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1 if small else 2,
        block_out_channels=(8, 8, 16, 16) if small else (128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4 if small else 32, sample_size=(64 if small else 512) * (2 if name == "sdxl" else 1),
        scaling_factor=0.13025 if name == "sdxl" else 0.18215, force_upcast=name == "sdxl",
    )


def _flow_transformer_kwargs(name: str, small: bool) -> dict:
    """SD3.5-medium's ``SD3Transformer2DModel`` / FLUX.1-dev's ``FluxTransformer2DModel`` (``small``: tiny widths)."""
    if name == "sd35m":
        return dict(
            sample_size=8 if small else 128, patch_size=2, in_channels=16, out_channels=16, num_layers=2 if small else 24,
            attention_head_dim=8 if small else 64, num_attention_heads=2 if small else 24,
            joint_attention_dim=_t5_width(name, small), caption_projection_dim=16 if small else 1536,  # = heads x head dim
            pooled_projection_dim=64 if small else 2048,  # the two CLIPs' projections side by side
            pos_embed_max_size=8 if small else 384, dual_attention_layers=(0,) if small else tuple(range(13)), qk_norm="rms_norm",
        )
    return dict(  # FLUX.1-dev
        patch_size=1, in_channels=64, out_channels=None, num_layers=1 if small else 19, num_single_layers=1 if small else 38,
        attention_head_dim=8 if small else 128, num_attention_heads=2 if small else 24, joint_attention_dim=_t5_width(name, small),
        pooled_projection_dim=32 if small else 768, guidance_embeds=True, axes_dims_rope=(2, 2, 4) if small else (16, 56, 56),
    )


def _pixart_transformer_kwargs(small: bool) -> dict:
    """PixArt-Sigma-XL-2-1024-MS's ``PixArtTransformer2DModel`` (``small``: tiny widths)."""
    heads, head_dim = (2, 8) if small else (16, 72)
    return dict(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=2 if small else 28,
        cross_attention_dim=heads * head_dim, patch_size=2, caption_channels=_t5_width("pixart", small), sample_size=8 if small else 128,
        interpolation_scale=2, use_additional_conditions=False,
    )


def _t5_width(name: str, small: bool) -> int:
    """T5's token embedding width, the transformer's text width (SD3: at least the two CLIPs' hidden sizes together)."""
    return (64 if name == "sd35m" else 32) if small else 4096


def _t5_config(name: str, tokenizer, small: bool):
    from transformers import T5Config

    width = _t5_width(name, small)
    return T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8 if small else 64, d_ff=2 * width if small else 10240, num_layers=1,
                    num_heads=4 if small else 64, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def _flow_vae_kwargs(name: str, small: bool) -> dict:
    """The 16-channel VAE of SD3 and FLUX.1 (the same topology, their own latent shift and scale)."""
    shift_scale = dict(scaling_factor=1.5305, shift_factor=0.0609) if name == "sd35m" else dict(scaling_factor=0.3611, shift_factor=0.1159)
    return dict(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1 if small else 2,
        block_out_channels=(8, 8, 16, 16) if small else (128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4 if small else 32, sample_size=64 if small else 1024, force_upcast=True,
        use_quant_conv=False, use_post_quant_conv=False, **shift_scale,
    )


def _flow_scheduler(name: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if name == "sd35m":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    # FLUX.1-dev: the shift grows with the image's token count, from 256 to 4096 tokens (512 to 1024 px)
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def _clip(kind: str, tokenizer, small: bool, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if small:
        ids["vocab_size"] = len(tokenizer)
    config = CLIPTextConfig(**{**_text_kwargs(kind, small), **ids})
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def arch_components(name: str, tokenizer, small: bool = False, t5_tokenizer=None) -> dict:
    """Randomly initialised components of ``name`` (``small``: the same topology, tiny widths).

    The T5 models (``sd35m``, ``flux``, ``pixart``) need ``t5_tokenizer`` for their T5 stand-in.
    """
    if name in FLOW_MODELS:
        return _flow_components(name, tokenizer, t5_tokenizer, small)
    if name == "pixart":
        return _pixart_components(t5_tokenizer, small)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    components = {
        "unet": UNet2DConditionModel(**_unet_kwargs(name, small)),
        "vae": AutoencoderKL(**_vae_kwargs(name, small)),
        "text_encoder": _clip("clip-l", tokenizer, small, projection=False),
        "tokenizer": tokenizer,
        "scheduler": sd15_scheduler(),  # SD-1.5 and SDXL share this noise schedule
    }
    if name == "sdxl":
        components["text_encoder_2"] = _clip("clip-bigg", tokenizer, small, projection=True)
        components["tokenizer_2"] = tokenizer
    return components


def _flow_components(name: str, tokenizer, t5_tokenizer, small: bool) -> dict:
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import T5EncoderModel

    t5 = T5EncoderModel(_t5_config(name, t5_tokenizer, small))
    vae = AutoencoderKL(**_flow_vae_kwargs(name, small))
    if name == "flux":  # CLIP-L's pooled embedding, T5's token embeddings
        return dict(transformer=FluxTransformer2DModel(**_flow_transformer_kwargs(name, small)), vae=vae, scheduler=_flow_scheduler(name),
                    text_encoder=_clip("clip-l", tokenizer, small, projection=False), tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    return dict(  # SD3.5: CLIP-L's and CLIP-G's penultimate states and projections side by side, then T5's tokens
        transformer=SD3Transformer2DModel(**_flow_transformer_kwargs(name, small)), vae=vae, scheduler=_flow_scheduler(name),
        text_encoder=_clip("clip-l", tokenizer, small, projection=True), tokenizer=tokenizer,
        text_encoder_2=_clip("clip-bigg", tokenizer, small, projection=True), tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


def _pixart_components(t5_tokenizer, small: bool) -> dict:
    """PixArt-Sigma: T5's tokens alone, SDXL's VAE, the DPM-Solver++ sampler it ships with."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5EncoderModel

    with torch.device("cpu"):  # the scheduler moves its tables to the CPU, which a meta tensor cannot do
        scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon")
    return dict(transformer=PixArtTransformer2DModel(**_pixart_transformer_kwargs(small)), vae=AutoencoderKL(**_vae_kwargs("sdxl", small)),
                text_encoder=T5EncoderModel(_t5_config("pixart", t5_tokenizer, small)), tokenizer=t5_tokenizer, scheduler=scheduler)


def _pipeline(name: str, components: dict):
    from diffusers import FluxPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if name == "pixart":
        return PixArtSigmaPipeline(**components)
    if name == "sdxl":
        return StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    if name == "sd15":
        return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return (FluxPipeline if name == "flux" else StableDiffusion3Pipeline)(**components)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_arch(name: str, folder: str | Path | None = None, small: bool = False, *, words: Sequence[str]) -> Path:
    """A diffusers folder with ``name``'s architecture and random weights, cached (SD-1.5 / SDXL /
    PixArt-Sigma in fp16; SD3.5-medium / FLUX.1-dev in bf16, their training precision; each T5 a stand-in).

    The tokenizers are word-level (CLIP's 77-token length; T5's as the pipelines pad it) over
    ``words`` (a world's vocabulary), so prompts are that world's; the CLIP encoders keep CLIP's
    49408-token embedding tables. On a GPU the weights are created there, in the saved dtype: a
    12B-parameter FLUX transformer takes seconds, not the CPU's many minutes.
    """
    from filelock import FileLock

    one_of(name, ARCH_MODELS, "model")
    folder = Path(folder) if folder else cache_root() / "bench" / f"{name}{'-small' if small else ''}-random-v{ARCH_VERSION}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(build_lock(folder)):
        if (folder / "model_index.json").is_file():
            return folder
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer = write_word_tokenizer(staging / "tokenizer-build", words, max_length=77)
        t5_tokenizer = write_t5_tokenizer(staging / "t5-tokenizer-build", words, max_length=512) if name in T5_MODELS else None
        cuda = torch.cuda.is_available()
        dtype = torch.bfloat16 if name in FLOW_MODELS else torch.float16
        torch.manual_seed(0)
        # random init of billions of parameters is much faster on a GPU, and in the saved dtype needs half the memory
        with torch.device("cuda" if cuda else "cpu"), _default_dtype(dtype if cuda else torch.float32):
            pipe = _pipeline(name, arch_components(name, tokenizer, small, t5_tokenizer))
        pipe.to(dtype).save_pretrained(str(staging), safe_serialization=True)
        del pipe
        for build in ("tokenizer-build", "t5-tokenizer-build"):
            shutil.rmtree(staging / build, ignore_errors=True)
        notes = {"model": name, "small": small, "version": ARCH_VERSION, "weights": f"random, {str(dtype).removeprefix('torch.')}"}
        if name in T5_MODELS:
            notes["text_encoder"] = "T5 stand-in: one tiny T5 encoder layer" if small else T5_STAND_IN
        atomic_write_json(staging / METADATA, notes)
        staging.rename(folder)
    return folder


def arch_notes(folder: str | Path) -> dict:
    """What ``build_arch`` wrote about a folder it built (``{}`` for any other folder)."""
    path = Path(folder) / METADATA
    return json.loads(path.read_text()) if path.is_file() else {}


def native_resolution(folder: str | Path) -> int:
    """The side, in pixels, the denoiser was built for: its sample size (latent pixels) times the VAE's scale.

    FLUX's transformer has no sample size; its VAE's (1024 px in FLUX.1) is FluxPipeline's default image side.
    """
    folder = Path(folder)
    denoiser = "unet" if (folder / "unet").is_dir() else "transformer"
    config = json.loads((folder / denoiser / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    return int(config["sample_size"]) * scale if "sample_size" in config else int(vae["sample_size"])
