"""``sspo export``: a LoRA run's final model, or one of its pool checkpoints, as one .safetensors file
that other tools load.

``kohya`` (UNet LoRAs: SD-1.5, SDXL, AnimateDiff): the key layout of kohya's sd-scripts
(``lora_unet_<layer>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``), which ComfyUI and
AUTOMATIC1111 load, and diffusers' ``load_lora_weights`` too. ``diffusers`` (a UNet's or a
transformer's, SD3, FLUX and PixArt): the file ``load_lora_weights`` reads, the adapter's config in
its metadata, as the run's ``final/`` holds it. Both are converted by diffusers' own converters; a
kohya file is read back by diffusers' kohya reader before it is written, and refused if a layer
would not come back under its own name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from sspo.config import load_config, load_yaml
from sspo.errors import SSPOError
from sspo.io import DamagedFileError, atomic_path, open_tensors, os_error_of, read_tensors, save_tensors, write_error
from sspo.models.families.base import ADAPTER_CONFIG, LORA_FILE, write_lora
from sspo.paths import set_aside_note
from sspo.training.pool import CheckpointPool
from sspo.training.run_folder import is_run_folder

FORMATS = ("kohya", "diffusers")
FINAL = "final"
UNET = "unet"  # the denoiser kohya's layout names (SD-1.5, SDXL, AnimateDiff); the other is "transformer" (SD3, FLUX)
_METADATA_KEY = "lora_adapter_metadata"  # where save_lora_weights puts the adapter's config in the file


@dataclasses.dataclass(frozen=True)
class Lora:
    """One adapter of a run, as peft holds it."""

    layers: dict[str, torch.Tensor]  # peft's state dict of the denoiser's adapter (``<layer>.lora_A.weight`` ...)
    config: dict  # its peft LoraConfig, as adapter_config.json holds it
    name: str  # what it is in the run: "final" or "checkpoint-002"
    component: str  # the pipeline component it adapts: "unet" or "transformer"


def export_lora(run: str | Path, fmt: str, checkpoint: str = FINAL, out: str | Path | None = None, force: bool = False) -> Path:
    """Write the run's final LoRA (``checkpoint`` "final") or pool checkpoint ``checkpoint`` in format ``fmt``
    to ``out`` (default: ``<run>-<checkpoint>-<fmt>.safetensors`` in the current folder); returns ``out``."""
    if fmt not in FORMATS:
        raise SSPOError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    run = Path(run)
    _check_lora_run(run)
    lora = read_final(run) if checkpoint == FINAL else read_pool_checkpoint(run, _pool_index(checkpoint))
    if fmt == "kohya" and lora.component != UNET:
        raise SSPOError(f"{run} trained a LoRA of the {lora.component}: kohya's layout is for UNet LoRAs (SD-1.5, SDXL, AnimateDiff); "
                        "export --format diffusers, the layout of the run's final/ (the file load_lora_weights reads)")
    out = Path(out) if out else Path(f"{run.resolve().name}-{lora.name}-{fmt}.safetensors")
    _check_out(out, force)
    try:
        if fmt == "kohya":
            save_tensors(to_kohya(lora), out, metadata=kohya_metadata(lora))
        else:
            write_diffusers(lora, out, run)
    except Exception as exc:  # safetensors reports a full disk as its own error
        if (failed := os_error_of(exc)) is None:
            raise
        raise write_error(out, failed) from None
    return out


def _check_lora_run(run: Path) -> None:
    if not os.path.exists(run):
        raise SSPOError(f"{run} does not exist; pass the output_dir that sspo train wrote")
    if not (run / "config.yaml").is_file():
        inside = f" ({run.parent}, it seems)" if (run.parent / "config.yaml").is_file() else ""  # final/ or pool/ given for the run
        raise SSPOError(f"{run} is not a training run's folder (no config.yaml there); pass the output_dir that sspo train wrote{inside}{set_aside_note(run)}")
    if not is_run_folder(run):
        raise SSPOError(f"{run} is not a training run's folder (its config.yaml and files are not what sspo train writes); pass the output_dir that sspo train wrote")
    final = run / FINAL
    if (final / "model_index.json").is_file() or not load_yaml(run / "config.yaml").get("model", {}).get("lora", True):
        where = f"the diffusers folder {final}" + ("" if final.is_dir() else ", once the run has finished")
        motion = f" (its trained motion modules alone: {final / 'motion_adapter'}, which MotionAdapter.from_pretrained loads)" if (final / "motion_adapter").is_dir() else ""
        raise SSPOError(f"{run} fine-tuned without LoRA (model.lora: false): export is for LoRA runs; the full model is {where}, "
                        f"which DiffusionPipeline.from_pretrained loads{motion}")


def _lora_component(file: Path) -> str:
    """The pipeline component a diffusers-format LoRA file adapts, by its keys' prefix."""
    handle, _ = open_tensors(file, what="the final LoRA", fix="restore it, or train the run again")
    return next(iter(handle.keys()), UNET).split(".")[0]


def _pool_index(checkpoint: str) -> int:
    if not (checkpoint.isascii() and checkpoint.isdigit()):
        raise SSPOError(f"--checkpoint {checkpoint!r}: expected final or the number of a pool checkpoint (0: the initial model)")
    return int(checkpoint)


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise SSPOError(f"--out {out} is a folder; name the file to write, e.g. --out {out / 'lora.safetensors'}")
    if out.suffix != ".safetensors":  # a .ckpt or .pt name would tell a loader to unpickle it
        raise SSPOError(f"--out {out}: export writes a safetensors file; name it {out.with_suffix('.safetensors').name}")
    if out.exists() and not force:
        raise SSPOError(f"{out} exists; pass --force to replace it, or choose another --out")


def read_final(run: Path) -> Lora:
    """The run's final LoRA, with the adapter config saved in its file."""
    file = run / FINAL / LORA_FILE
    if not file.is_file():
        raise SSPOError(f"{run} has no final LoRA ({file}) yet: finish the run (sspo train CONFIG --resume), or export a pool checkpoint (--checkpoint N)"
                        f"{set_aside_note(run)}")
    fix = "restore it, or train the run again"
    component = _lora_component(file)
    config = _adapter_config_of(file, fix, component)
    if config is None:
        raise SSPOError(f"the final LoRA {file} holds no adapter config ({_METADATA_KEY} in its metadata); {fix}")
    from diffusers.utils import convert_unet_state_dict_to_peft

    tensors = read_tensors(file, what="the final LoRA", fix=fix)
    layers = {key.removeprefix(f"{component}."): value for key, value in tensors.items()}
    # A UNet's file is in diffusers' layout; a transformer's holds peft's keys already (write_lora).
    return Lora(convert_unet_state_dict_to_peft(layers) if component == UNET else layers, config, FINAL, component)


def _adapter_config_of(file: Path, fix: str, component: str) -> dict | None:
    """The ``component`` adapter's config that save_lora_weights wrote into ``file``'s metadata (None: none there)."""
    _, metadata = open_tensors(file, what="the final LoRA", fix=fix)
    if _METADATA_KEY not in metadata:
        return None
    try:
        packed = json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError:
        raise SSPOError(f"the final LoRA {file} is damaged (its adapter config is not JSON); {fix}") from None
    prefix = f"{component}."
    return {key.removeprefix(prefix): value for key, value in packed.items() if key.startswith(prefix)} or None


def read_pool_checkpoint(run: Path, index: int) -> Lora:
    """Pool checkpoint ``index`` of the run (0: the initial model), with the pool's adapter config."""
    pool = CheckpointPool(run / "pool")
    if not len(pool):
        raise SSPOError(f"{run} keeps no checkpoint pool (its method trains without one); export its final LoRA (--checkpoint final)")
    if index >= len(pool):
        raise SSPOError(f"--checkpoint {index}: the pool of {run} holds checkpoints 0 to {len(pool) - 1} (after steps {', '.join(map(str, pool.steps()))})")
    if index not in pool.kept():
        raise SSPOError(f"--checkpoint {index}: the pool of {run} released it (its erd never draws it again); export one it keeps "
                        f"({', '.join(map(str, pool.kept()))}) or the final model (--checkpoint final)")
    final = run / FINAL / LORA_FILE
    # The pool's index says what it adapts; a pool of an index without it, the final LoRA, or the run's model.
    component = pool.denoiser or (_lora_component(final) if final.is_file() else _model_index(run).get("denoiser", UNET))
    config = pool.adapter_config()
    if config is None and final.is_file():  # a pool written without its adapter config: the final LoRA's is the same
        config = _adapter_config_of(final, "restore it, or train the run again", component)
    if config is None:
        raise SSPOError(f"the pool of {run} has no adapter config ({pool.root / ADAPTER_CONFIG}); resume the run (sspo train CONFIG --resume) to write it")
    try:
        layers = pool.load(index)
    except DamagedFileError as exc:  # a resume would not bring back a finished run's pool file
        other = "the run's final model (--checkpoint final)" if final.is_file() else "another pool checkpoint (--checkpoint N)"
        raise DamagedFileError(exc.problem, f"restore it from a copy, or export {other}") from None
    return Lora(layers, config, f"checkpoint-{index:03d}", component)


def _model_index(run: Path) -> dict:
    """What the model ``run`` trained is, from its config.yaml and the model's model_index.json (no
    weights read): its ``pipeline`` class name, ``denoiser`` component and ``family`` (a ModelFamily
    class); empty where the model cannot be read here (offline, moved)."""
    from sspo.models.families import family_of
    from sspo.training.config import TrainConfig
    from sspo.training.trainer import model_files

    try:
        cfg = load_config(TrainConfig, run / "config.yaml")
        files = model_files(cfg)
        if files.config is not None:
            family = family_of(files.config, cfg.model.family)
            return {"pipeline": files.config["_class_name"], "denoiser": family.denoiser_component, "family": type(family)}
    except SSPOError:
        pass
    return {}


def to_kohya(lora: Lora) -> dict[str, torch.Tensor]:
    """``lora`` in kohya's key layout, each layer's alpha the run's ``lora_alpha``; refused where
    diffusers' kohya reader would not give a layer back under its own name."""
    from diffusers.utils import convert_state_dict_to_kohya

    tensors = convert_state_dict_to_kohya({f"{UNET}.{key}": value for key, value in lora.layers.items()})
    # The converter writes each alpha as the layer's rank (a scale of 1); the run's scale is lora_alpha / rank.
    alpha = float(lora.config["lora_alpha"])
    tensors = {key: torch.tensor(alpha) if key.endswith(".alpha") else value for key, value in tensors.items()}
    _check_kohya_reads_back(tensors, lora)
    return tensors


def kohya_metadata(lora: Lora) -> dict[str, str]:
    """The network's shape as sd-scripts records it in its files, which kohya tools show (loaders read the keys)."""
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(lora.config["r"]), "ss_network_alpha": f"{float(lora.config['lora_alpha']):g}"}


def _check_kohya_reads_back(tensors: dict[str, torch.Tensor], lora: Lora) -> None:
    """kohya's layout joins a layer's name with underscores, and diffusers' reader splits it again
    by what it knows of SD and SDXL UNets: a layer named otherwise would load nowhere, silently."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    state_dict, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(tensors))  # the reader takes keys out of the dict it is given
    prefix = f"{UNET}."
    read_back = convert_unet_state_dict_to_peft({key.removeprefix(prefix): value for key, value in state_dict.items()})
    lost = sorted({key.rpartition(".lora_")[0] for key in lora.layers if key not in read_back})
    if lost:
        raise SSPOError(
            f"kohya's key layout cannot carry {len(lost)} layer{'s' if len(lost) > 1 else ''} of this LoRA (e.g. {', '.join(lost[:3])}): "
            "diffusers' kohya reader does not map these names back; export --format diffusers instead, which keeps every layer"
        )


def write_diffusers(lora: Lora, out: Path, run: Path) -> None:
    """``lora`` as the file ``load_lora_weights`` reads, written as the run's final LoRA is: a
    transformer's by its family's writer (the layout is its pipeline's), a UNet's by any UNet
    pipeline's loader."""
    import diffusers
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    loader = StableDiffusionLoraLoaderMixin
    if lora.component != UNET:
        model = _model_index(run)
        pipeline = model.get("pipeline")
        if pipeline is None:
            raise SSPOError(f"{run}'s model (config.yaml's model.pretrained) cannot be read here, and a {lora.component} LoRA's file is written "
                            "by its pipeline; export where the model is, or load the pool checkpoint with peft (docs/coming-from-diffusers.md)")
        if not hasattr(diffusers, pipeline):
            raise SSPOError(f"{run}'s model is a {pipeline}, which this diffusers does not have; upgrade diffusers, "
                            "or load the pool checkpoint with peft (docs/coming-from-diffusers.md)")
        loader = model["family"].lora_writer(getattr(diffusers, pipeline))
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as folder:
        write_lora(loader, lora.component, lora.layers, lora.config, Path(folder))
        os.replace(Path(folder) / LORA_FILE, tmp)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SSPOError(f"--push-to-hub {repo_id!r} is not a hub repository id; give one like your-name/sspo-lora "
                        "(letters, digits, '-', '_' and '.')") from None


def push_to_hub(file: Path, repo_id: str) -> str:
    """Upload ``file`` to the hub model repository ``repo_id`` (made if missing); returns the repository's URL.
    The token is huggingface_hub's own: $HF_TOKEN, or the one ``hf auth login`` saved."""
    import huggingface_hub

    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_file(path_or_fileobj=str(file), path_in_repo=file.name, repo_id=repo_id, commit_message=f"sspo export: {file.name}")
    except Exception as exc:  # the hub client raises its HTTP library's errors, which differ between its versions, besides its own
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SSPOError(f"--push-to-hub {repo_id}: the upload failed ({reason}); {file} is written: once the hub is reachable and HF_TOKEN "
                        "holds a token that may write there, run the same command with --force to write and push it again") from None
    return str(url)
