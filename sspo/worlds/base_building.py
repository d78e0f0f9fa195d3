"""What any world builds its base model with, and where the base is found: shipped in the package,
cached under ``cache_root()`` by its recipe's cache key, or built now.

A world's base recipe is a config dataclass with ``size`` and ``cache_key()``; its build pretrains
the VAE (:func:`train_vae`) and the denoiser (:func:`train_denoiser`) on the world's renders
(:func:`pretraining_renders`) and saves the pipeline with its recipe (:func:`save_base`), all
through :func:`cached_build`. :func:`round_trip_images` passes images through a VAE as training
encodes them, for a world's checks of its base.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sspo.config import to_dict
from sspo.errors import ConfigError
from sspo.io import check_write_target, entry_list
from sspo.models.condition import TextCondition
from sspo.models.pipeline import encode_images
from sspo.models.tiny import one_thread
from sspo.paths import build_lock, cache_root

log = logging.getLogger(__name__)


def pretraining_renders(specs, per_spec: int, cfg, render: Callable, render_defect: Callable) -> tuple[list, list[str]]:
    """``per_spec`` renders of every spec, ``cfg.defect_fraction`` of them with one of ``cfg.defects``
    (``render_defect(spec, rng, defect)``), and their prompts; seeded by ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    renders, prompts = [], []
    for spec in specs:
        for _ in range(per_spec):
            renders.append(render_defect(spec, rng, rng.choice(cfg.defects)) if rng.random() < cfg.defect_fraction else render(spec))
            prompts.append(spec.prompt)
    return renders, prompts


def pixel_batch(images) -> torch.Tensor:
    """RGB images as one [-1, 1] batch. Its memory stays in the images' channels-last order: the
    shipped bases were built from that layout, and a contiguous copy changes its bits."""
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae, pixels: torch.Tensor, steps: int, learning_rate: float, cfg, generator: torch.Generator, phase: str) -> None:
    """Train ``vae`` for reconstruction on ``pixels`` (batches of ``cfg.vae_batch_size``), one-cycle to ``learning_rate``."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    # One-cycle: a VAE trained at a constant rate reconstructs edges too softly for the evaluator.
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.05)
    for _ in tqdm(range(steps), desc=f"base: VAE ({phase})", leave=False):
        batch = pixels[torch.randint(len(pixels), (cfg.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)


def word_conditions(text_encoder, tokenizer, prompts: list[str]) -> tuple[TextCondition, TextCondition]:
    """The fixed word-table encoder's condition of every prompt, and of the empty prompt."""
    def tokens(texts):
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids

    with torch.no_grad():
        return TextCondition(text_encoder(tokens(prompts))[0]), TextCondition(text_encoder(tokens([""]))[0])


def _dropped(cond: TextCondition, empty: TextCondition, drop: torch.Tensor) -> TextCondition:
    """``cond`` with the rows ``drop`` marks replaced by the empty prompt's condition, in every field."""
    fields = {}
    for field in dataclasses.fields(cond):
        value = getattr(cond, field.name)
        if value is not None:
            value = value.clone()
            value[drop] = getattr(empty, field.name)
        fields[field.name] = value
    return TextCondition(**fields)


def train_denoiser(family, conds: TextCondition, prompt_of: torch.Tensor, empty: TextCondition, latents, cfg, generator) -> None:
    """Pretrain ``family``'s denoiser on (latent, prompt) pairs: latent ``i``'s condition is
    ``conds[prompt_of[i]]`` (the text encoders stay fixed), ``empty`` the caption dropout's; ``cfg``:
    its steps, batch, learning rate and caption dropout."""
    denoiser = family.denoiser
    params = list(denoiser.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.denoiser_learning_rate, weight_decay=1e-2)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.denoiser_learning_rate, total_steps=cfg.denoiser_steps, pct_start=0.05)
    bar = tqdm(range(cfg.denoiser_steps), desc="base: denoiser", leave=False)
    for _ in bar:
        index = torch.randint(len(latents), (cfg.batch_size,), generator=generator)
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        cond = _dropped(conds[prompt_of[index]], empty, drop)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = family.draw_timesteps((cfg.batch_size,), generator)
        loss = family.denoising_errors(denoiser, x0, noise, t, cond).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")


RECORD = "sspo_base.json"  # a built base's recipe: its config and cache key (save_base)


def _record(folder: Path) -> dict | None:
    """``folder``'s recipe record (None: there is no readable one)."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _built_from(folder: Path, cfg) -> bool:
    return (_record(folder) or {}).get("cache_key") == cfg.cache_key() and (folder / "model_index.json").is_file()


def packaged_base(cfg, packaged: Path) -> Path | None:
    """The shipped base folder ``packaged`` if it was built from ``cfg`` (same recipe version and settings)."""
    return packaged if _built_from(packaged, cfg) else None


def check_base_folder(output: Path, cfg, force: bool) -> None:
    """Refuse to build into a folder that holds anything but a base sspo built, or (unless ``force``)
    a base built with other settings: its files stay as they are."""
    check_write_target(output, "base folder")
    if not output.exists():
        return
    names, record = [p.name for p in output.iterdir()], _record(output)
    if names and record is None:
        raise ConfigError(f"base folder {output} holds files that are not an sspo base ({entry_list(names)}); choose an empty or new folder")
    if names and record.get("cache_key") != cfg.cache_key() and not force:
        saved, wanted = record.get("config") or {}, json.loads(json.dumps(to_dict(cfg)))
        differences = [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in wanted.items() if saved.get(key) != value] or ["another recipe version"]
        raise ConfigError(f"base folder {output} holds a base built with other settings ({'; '.join(differences)}); choose another folder, or rebuild it there with --force")


def cache_folder(cfg, name: str) -> Path:
    """Where base ``cfg`` (of kind ``name``) is cached."""
    return cache_root() / f"{name}-{cfg.size}-{cfg.cache_key()}"


def existing_base(cfg, name: str, packaged: Path) -> Path | None:
    """The folder of base ``cfg`` if it is shipped or cached already; None if it would be built."""
    if shipped := packaged_base(cfg, packaged):
        return shipped
    cached = cache_folder(cfg, name)
    return cached if _built_from(cached, cfg) else None


def cached_build(cfg, build: Callable[[Any, Path, Path], Path], name: str, packaged: Path, output: str | Path | None = None, force: bool = False) -> Path:
    """A world's base folder: shipped in ``packaged``, cached as ``name-<size>-<key>``, or built now
    by ``build(cfg, staging, folder)``; ``force`` builds it even when shipped or cached.

    A given ``output`` is checked before anything is built (:func:`check_base_folder`); ``build``
    writes ``staging`` beside it and :func:`save_base` moves the finished base into place, so a
    failed build leaves ``output`` as it was and no staging behind.
    """
    from filelock import FileLock

    if output is None and not force and (shipped := packaged_base(cfg, packaged)):
        return shipped
    given = output is not None
    output = Path(output) if given else cache_folder(cfg, name)
    if given:
        check_write_target(output, "base folder")  # a file where a parent folder should be, before any folder is made
    output.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(build_lock(output)):  # parallel test workers and runs share one build
        if not force and _built_from(output, cfg):
            log.debug("%s model cached at %s", name, output)  # reused: news only under --verbose
            return output
        if given:  # a cache folder is sspo's own: a damaged or stale one is rebuilt
            check_base_folder(output, cfg, force)
        staging = output.with_name(f".{output.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        # One thread: the build is then bitwise repeatable whatever the machine's thread setting
        # (float sums depend on how work is split), and the tiny models gain little from more:
        # on a busy 2-core machine two threads make it many times slower.
        try:
            with one_thread():
                return build(cfg, staging, output)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def unit_variance_latents(vae, pixels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Every sample's latents, the VAE's ``scaling_factor`` set first so that they have unit variance
    (as SD's 0.18215 does: the noise schedule fits them)."""
    raw = torch.cat([encode_images(vae, part) / vae.config.scaling_factor for part in pixels.split(chunk)])
    vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
    return raw * vae.config.scaling_factor


def save_base(pipe, cfg, staging: Path, output: Path, started: float) -> Path:
    """Save a built base with its recipe (``sspo_base.json``) in ``staging``, then move it to ``output``."""
    pipe.save_pretrained(staging, safe_serialization=True)
    for config in staging.glob("*/config.json"):  # a component loaded from a folder names it: the bytes would depend on the machine
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    (staging / RECORD).write_text(json.dumps({"config": to_dict(cfg), "cache_key": cfg.cache_key(), "seconds": round(time.time() - started, 1)}, indent=2))
    # The base it replaces (--force) is moved aside, not deleted, until the new one is in place: a
    # kill between the two leaves no half-deleted base in `output`, and the next build clears it.
    replaced = output.with_name(f".{output.name}.replaced")
    shutil.rmtree(replaced, ignore_errors=True)
    if output.exists():
        os.replace(output, replaced)
    os.replace(staging, output)
    shutil.rmtree(replaced, ignore_errors=True)
    log.info("built %s in %.0f s at %s", type(pipe).__name__, time.time() - started, output)
    return output


@torch.no_grad()
def round_trip_images(vae, images, batch: int = 64) -> list[np.ndarray]:
    """``images`` encoded by ``vae`` as training encodes them (posterior mode) and decoded, in batches of ``batch``."""
    from sspo.models.pipeline import decode_images

    return [image for part in pixel_batch(images).split(batch) for image in decode_images(vae, encode_images(vae, part))]
