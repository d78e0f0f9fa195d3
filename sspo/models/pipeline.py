"""Diffusers pipelines as the trainer sees them: loaded (with a LoRA) and checked, and their latents.

One code path serves SD-1.5, SDXL, AnimateDiff, PixArt, SD3 and FLUX (and the tiny shapes-world pipelines, which
are the same classes with small sizes); what differs between them is their model family
(sspo/models/families/): a UNet or a transformer, diffusion or flow matching. Video latents are
``(B, C, F, H, W)``.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import torch

from sspo.errors import ModelError
from sspo.logs import muted
from sspo.models.families import family_of
from sspo.models.families.base import ADAPTER_CONFIG, LORA_FILE

HUB_PROBE_SECONDS = 5  # a reachable hub answers within this; an unreachable one costs half a minute of retries per file


def _locate(model: str | Path) -> str:
    """A hub id as given, once the hub is reachable (or offline mode is on), or a local folder that
    must hold a diffusers pipeline."""
    model = str(model)
    if not (model.startswith((".", "/", "~")) or Path(model).exists()):
        check_hub(model, gated=True)
        return model
    if not Path(model).expanduser().exists():
        raise ModelError(f"model path {model} does not exist; pass a hub id, a save_pretrained folder or a world's base such as shapes-base")
    folder = Path(model).expanduser()
    if not (folder / "model_index.json").is_file():
        if any(folder.glob("*lora*.safetensors")):  # a run's final/ of a LoRA run, say
            raise ModelError(f"model path {model} holds a LoRA, not a pipeline; pass it as the LoRA (--lora of sspo sample and eval) "
                             "and the model it was trained on as the model")
        if (folder / "final" / "model_index.json").is_file():  # a full fine-tuning run's output_dir
            raise ModelError(f"model path {model} is a training run's folder; its model is {folder / 'final'}: pass that")
        raise ModelError(
            f"model path {model} is not a diffusers pipeline folder (no model_index.json there); "
            "pass a hub id, a save_pretrained folder, or a world's base such as shapes-base"
        )
    return str(Path(model).expanduser())


def denoiser_skeleton(model: str | Path, config: dict, component: str, revision: str | None = None) -> torch.nn.Module:
    """The pipeline's ``component`` (``config``: its model_index.json) built from its own config on
    the meta device: every layer, no weights read or allocated."""
    from accelerate import init_empty_weights

    cls = _component_class(model, config, component)
    # Some layers draw their initial values before init_empty_weights moves them to the meta device:
    # the global RNG, which seeds a run's LoRA, is left as it was.
    with torch.random.fork_rng(devices=[]), init_empty_weights():
        return cls.from_config(component_config(model, config, component, revision))


def component_config(model: str | Path, config: dict, component: str, revision: str | None = None) -> dict:
    """The config of the pipeline's ``component`` (``config``: its model_index.json), files only."""
    cls = _component_class(model, config, component)
    try:
        return dict(cls.load_config(_locate(model), subfolder=component, revision=revision))
    except (OSError, ValueError) as exc:
        raise _load_error(model, exc) from None


def _component_class(model: str | Path, config: dict, component: str) -> type:
    """The diffusers class that model_index.json (``config``) names for ``component``."""
    import diffusers

    entry = config.get(component)
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None
    cls = getattr(diffusers, name, None) if name else None
    if not isinstance(cls, type):
        raise ModelError(f"model_index.json of model {model}: entry {component!r} is {json.dumps(entry)}, not [library, class] naming a class of this "
                         f"diffusers {diffusers.__version__} (e.g. [\"diffusers\", \"UNet2DConditionModel\"]); copy or download the model again, "
                         "or upgrade diffusers if the class is newer")
    return cls


def vae_scale_factor(vae_config: dict) -> int:
    """How many pixels a latent pixel spans, as diffusers' pipelines compute it."""
    blocks = vae_config.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else 8


def check_hub(model: str, gated: bool = False) -> None:
    """Refuse hub id ``model`` at once when the hub cannot be reached and offline mode is off, rather
    than after every file's retries: a ModelError that says how to load it without the hub (with
    ``gated``, as a diffusion model may be, what a gated one needs first)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.is_offline_mode() or hub_reachable():
        return
    cached = isinstance(try_to_load_from_cache(model, "model_index.json"), str) or isinstance(try_to_load_from_cache(model, "config.json"), str)
    fix = ("it is in the local cache: set HF_HUB_OFFLINE=1 to load it from there" if cached else
           f"download it where the hub is reachable (`hf download {model}`"
           + ("; a gated model such as FLUX.1-dev needs its license accepted on the hub and `hf auth login` first" if gated else "")
           + ") and pass its folder, or fill the cache there and set HF_HUB_OFFLINE=1")
    raise ModelError(f"cannot load {model!r}: the Hugging Face hub ({constants.ENDPOINT}) is unreachable; {fix}")


@functools.cache
def hub_reachable() -> bool:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except Exception:  # noqa: BLE001  (the HTTP client's connection errors differ between huggingface_hub versions)
        return False
    return True


def _load_error(model: str | Path, exc: Exception) -> ModelError:
    hint = "" if Path(str(model)).expanduser().exists() else " (a hub id needs the hub or its local cache; offline, download the model and pass its folder)"
    # diffusers looks for .safetensors, then for the older .bin, and names only the .bin when neither is there
    message = re.sub(r"Error no file named (\S+)\.bin found in directory (\S+?)\.?$",
                     r"no weights file (\1.safetensors or .bin) in \2: the folder is incomplete; copy or download the model again", str(exc))
    return ModelError(f"cannot load diffusion model {str(model)!r}: {message}{hint}")


def load_pipeline_config(model: str | Path, revision: str | None = None) -> dict:
    """A pipeline's ``model_index.json`` (class and components), without loading any weights."""
    from diffusers import DiffusionPipeline

    located = _locate(model)
    try:
        config = dict(DiffusionPipeline.load_config(located, revision=revision))
    except (OSError, ValueError) as exc:
        raise _load_error(model, exc) from None
    # A component is [library, class] ([null, null]: left out); other entries are the pipeline's settings.
    damaged = [name for name, entry in config.items() if isinstance(entry, list) and not (len(entry) == 2 and all(v is None or isinstance(v, str) for v in entry))]
    if damaged:
        raise ModelError(f"model_index.json of model {model}: entry {damaged[0]!r} is {json.dumps(config[damaged[0]])}, not [library, class] "
                         "(e.g. [\"diffusers\", \"UNet2DConditionModel\"]); copy or download the model again")
    from sspo.models.families import FAMILIES

    family = next((family for family in FAMILIES.values() if family.detects(config)), None)
    if family is None:
        for name in sorted({family.denoiser_component for family in FAMILIES.values()} & config.keys()):
            if config[name] != [None, None]:  # families detect by the denoiser's class: a damaged or newer one is named as such
                _component_class(model, config, name)
        trained = ", ".join(dict.fromkeys(family.title or family.name for family in FAMILIES.values()))
        raise ModelError(f"model {model} ({config.get('_class_name')}) is of no model family sspo trains; it trains {trained} pipelines")
    _component_class(model, config, family.denoiser_component)  # named here, not by diffusers' loading
    if "motion_adapter" not in config and "MotionModel" in str(config.get("unet")):
        raise ModelError(f"model {model}: its UNet ({config['unet'][1]}) is a video UNet, but {config.get('_class_name')} is not an AnimateDiff pipeline (no motion_adapter)")
    folder = Path(located)
    if folder.is_dir():  # a local folder, not a hub id
        # A component's missing folder would not always fail the load (a tokenizer loads empty and
        # fails at the first prompt); the safety checker is never loaded.
        missing = [f"{name}/" for name, value in config.items() if isinstance(value, list) and None not in value and name != "safety_checker" and not (folder / name).is_dir()]
        if missing:
            raise ModelError(f"model folder {model} lacks {', '.join(missing)}, listed in its model_index.json: the folder is incomplete; copy or download the model again")
    return config


def motion_frames_limit(model: str | Path, motion_adapter: str | None = None) -> int | None:
    """The most frames the motion modules of local pipeline folder ``model``, or of local adapter
    folder ``motion_adapter``, take (``motion_max_seq_length``); None where no config on disk says."""
    configs = [Path(motion_adapter).expanduser() / "config.json"] if motion_adapter else []
    configs += [Path(model).expanduser() / "motion_adapter" / "config.json", Path(model).expanduser() / "unet" / "config.json"]
    for path in configs:
        try:
            value = json.loads(path.read_text()).get("motion_max_seq_length")
        except (OSError, ValueError, AttributeError):  # absent, unreadable, or not a JSON object: another config may say
            continue
        if isinstance(value, int):
            return value
    return None


def load_pipeline(model: str | Path, *, lora: str | Path | None = None, dtype: torch.dtype = torch.float32, revision: str | None = None,
                  variant: str | None = None, motion_adapter: str | Path | None = None):
    """Load a pipeline of a known model family from a hub id or a local folder, with an optional
    LoRA; ``motion_adapter`` makes an image pipeline (SD-1.5) an AnimateDiff one."""
    from diffusers import AnimateDiffPipeline, DiffusionPipeline, MotionAdapter

    config = load_pipeline_config(model, revision)  # a model of no known family is named here, before any weights load
    extra = {"safety_checker": None} if "safety_checker" in config else {}
    # A component saved as absent (SD3 without T5) must be passed as None, or from_pretrained asks for it.
    extra |= {name: None for name, value in config.items() if value == [None, None]}
    loader = DiffusionPipeline
    if motion_adapter:
        local = Path(str(motion_adapter)).expanduser()
        if local.exists() and not (local / "config.json").is_file():
            raise ModelError(f"model.motion_adapter {motion_adapter} is not a MotionAdapter folder (no config.json there)")
        if not local.exists():
            check_hub(str(motion_adapter))
        try:
            with muted("diffusers"):  # it logs a missing or damaged file before raising it
                extra = {"motion_adapter": MotionAdapter.from_pretrained(str(local) if local.exists() else str(motion_adapter), dtype=dtype)}
        except (OSError, ValueError) as exc:
            raise _load_error(motion_adapter, exc) from None
        _check_motion_adapter(model, motion_adapter, extra["motion_adapter"].config, revision)
        loader = AnimateDiffPipeline
    try:
        with muted("diffusers"):
            pipe = loader.from_pretrained(_locate(model), dtype=dtype, revision=revision, variant=variant, **extra)
    except (OSError, ValueError) as exc:
        raise _load_error(model, exc) from None
    if lora:
        lora_path = Path(lora).expanduser()
        check_lora_path(lora_path)
        family_of(pipe).load_lora(lora_path, model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_lora_path(lora: Path) -> None:
    """A LoRA path is a LoRA folder or file; sspo's other folders and files are named with what to pass instead."""
    if not lora.exists():
        from sspo.paths import set_aside_note

        raise ModelError(f"LoRA path {lora} does not exist; pass a LoRA folder (a run's final/) or its .safetensors file{set_aside_note(lora.parent)}")
    folder = lora if lora.is_dir() else lora.parent
    if (folder / "pool.json").is_file():
        export = f", or write pool checkpoint N as one: sspo export {folder.parent} --format diffusers --checkpoint N" if (folder / ADAPTER_CONFIG).is_file() else ""
        raise ModelError(f"LoRA path {lora} is in a training run's checkpoint pool (sspo's own format, not a LoRA diffusers loads); {_final_of(folder.parent)}{export}")
    if (folder / "trainer_state.json").is_file() or folder.name == "checkpoints" and (folder.parent / "config.yaml").is_file():
        run = folder.parent if folder.name == "checkpoints" else folder.parent.parent
        raise ModelError(f"LoRA path {lora} is in a training run's resumable states, not a LoRA; {_final_of(run)}")
    if lora.is_dir():
        if (lora / "model_index.json").is_file():
            raise ModelError(f"LoRA path {lora} is a whole diffusers pipeline, not a LoRA; pass it as the model (--model {lora}) without a LoRA")
        if not (lora / LORA_FILE).is_file() and ((lora / "config.yaml").is_file() or (lora / "final").is_dir()):
            raise ModelError(f"LoRA path {lora} is a training run's folder; {_final_of(lora)}")
        if not any(lora.glob("*.safetensors")) and not any(lora.glob("*.bin")):
            raise ModelError(f"LoRA folder {lora} holds no LoRA weights ({LORA_FILE}); pass the folder save_lora_weights wrote (a run's final/) or the weights file")
    file = lora / LORA_FILE if lora.is_dir() else lora
    if file.suffix == ".safetensors" and file.is_file():
        from sspo.io import open_tensors

        open_tensors(file, what="LoRA weights", fix="pass an intact copy, or train the run again")


def lora_location(lora: str | Path) -> Path:
    """Where a ``--lora`` value's weights are: a finished training run's folder stands for its final LoRA
    (``RUN/final``); anything else is taken as given (``check_lora_path`` says what is wrong with it)."""
    lora = Path(lora).expanduser()
    final = lora / "final"
    if (lora / "config.yaml").is_file() and not (lora / LORA_FILE).is_file() and (final / LORA_FILE).is_file():
        return final
    return lora


def _final_of(run: Path) -> str:
    """What to pass instead of a training run's folder ``run`` or a file in it."""
    final = run / "final"
    if (final / "model_index.json").is_file():
        return f"the run trained the whole model: pass --model {final} without a LoRA"
    if (final / LORA_FILE).is_file():
        return f"pass its final LoRA: {final}"
    return f"pass its final LoRA, {final}, once the run has finished (sspo train CONFIG --resume finishes it)"


def _check_motion_adapter(model, adapter_name, adapter: dict, revision: str | None) -> None:
    """What ``UNetMotionModel.from_unet2d`` does not check: channels (a mismatch fails deep in the
    first forward) and the image UNet's extra conditioning (all but SDXL's is dropped silently)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(_locate(model), subfolder="unet", revision=revision)
    if list(unet["block_out_channels"]) != list(adapter["block_out_channels"]):
        raise ModelError(
            f"motion adapter {adapter_name} is for UNet channels {list(adapter['block_out_channels'])}, but {model}'s UNet has "
            f"{list(unet['block_out_channels'])}; pass an adapter made for this base"
        )
    if unet.get("addition_embed_type") not in (None, "text_time"):
        raise ModelError(
            f"{model}'s UNet has addition_embed_type {unet['addition_embed_type']!r}, which AnimateDiff's UNetMotionModel ignores; "
            "use an image model without it (e.g. SD-1.5)"
        )


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] to latents ``[B, C, h, w]``, shifted (SD3) and scaled as the
    pipeline does (the posterior mean, so the same image gives the same x0). Clips ``[B, F, 3, H, W]`` go through the image VAE as B * F
    images and come back as ``[B, C, F, h, w]``, the layout of diffusers' video UNets (AnimateDiff)."""
    if images.ndim == 5:
        latents = encode_images(vae, images.flatten(0, 1))
        return latents.unflatten(0, images.shape[:2]).transpose(1, 2).contiguous()
    latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor) -> np.ndarray:
    """Scaled image latents to ``uint8`` RGB arrays ``[B, H, W, 3]``, rounded as diffusers' pipelines
    do; clip latents ``[B, C, F, h, w]`` to clips ``[B, F, H, W, 3]``, frame by frame."""
    if latents.ndim == 5:
        frames = decode_images(vae, latents.transpose(1, 2).flatten(0, 1))
        return frames.reshape(latents.shape[0], latents.shape[2], *frames.shape[1:])
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift).sample
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
