"""The one training recipe for every method of sspo/training/methods.py (docs/method.md), read top to bottom.

    for each iteration:                                  (the pool changes only here)
        build the iteration's pairs                      (pregenerate: grouped by checkpoint)
        for each optimizer step:
            complete its pairs (online: build them)      (sspo/training/pairs.py: the step only consumes them)
            for each micro-batch: policy errors -> loss -> backward
            clip, step, log
        add theta_n to the pool; save a resumable state; validate
    save the final model (diffusers folder or LoRA weights) and its model card

Several processes (``accelerate launch``, DDP): every process builds the pairs of its own
micro-batches — rows, ``t``, ``eps``, the pool checkpoint and the sampler seeds all come from
``(seed, m * num_processes + rank)``, so each process draws its own checkpoints and generates its
own negatives, and the run is reproducible for a given process count. Gradients are averaged
across processes at each optimizer step, so every process holds the same weights (checked at
each save: ``replicas`` in the state file). The pool is written by the main process only; the
others wait, then reload it (:meth:`Trainer._sync_pool`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sspo.config import check, save_yaml
from sspo.data.config import FILE_SOURCES
from sspo.data.dataset import load_dataset_from_config
from sspo.data.images import bucket_sizes
from sspo.data.loader import MicroBatchReader
from sspo.errors import ConfigError, DataError, SSPOError, TrainingError
from sspo.models.families import family_of
from sspo.models.pipeline import component_config, denoiser_skeleton, load_pipeline, load_pipeline_config, motion_frames_limit, vae_scale_factor
from sspo.training.checkpoints import Checkpointing, check_resumed_config, disk_errors, latest_state, resume_point, validation_grid_stem
from sspo.training.config import TrainConfig, check_environment, resolved
from sspo.training.faults import fault_point
from sspo.training.latent_cache import LatentCache, cache_key, data_digest, default_dir, encode_rows
from sspo.training.methods import METHODS
from sspo.training.pairs import PairBatch, PairBuilder, Rows, mean_over_draws, pair_errors
from sspo.training.pool import CheckpointPool
from sspo.training.reference import POLICY, ReferenceModel
from sspo.training.run_folder import check_output_dir, claimed, resumed_folder
from sspo.training.run_state import flatten
from sspo.training.ssr_truth import SSRTruth
from sspo.worlds import base_world, get_world
from sspo.worlds.names import check_not_a_misspelt_base, resolve_model
from sspo.worlds.registry import base_name

log = logging.getLogger(__name__)


def open_dataset(cfg: TrainConfig, read_first_row: bool = True):
    """The training data, checked against what ``cfg.method`` needs from it and, unless
    ``read_first_row`` is false (a dry run reads no images), to hold a readable row."""
    from accelerate import PartialState

    dataset = load_dataset_from_config(cfg.data)
    if cfg.spec.needs_dataset_losers and not dataset.has_losers:
        others = "/".join(m.name for m in METHODS.values() if not m.needs_dataset_losers)
        raise DataError(f"method {cfg.method!r} needs (winner, loser) pairs, but data.path {cfg.data.path} has single images; use a Pick-a-Pic-style parquet or method {others}")
    if read_first_row:
        dataset[0]  # the first readable row, or a DataError when no row reads (files all missing, say): before training starts
    if PartialState().is_main_process:  # warnings about the data, once
        warn_foreign_captions(cfg, dataset)
        if len(dataset) < cfg.optim.batch_size:
            log.warning("the data holds %d row%s, fewer than one micro-batch (optim.batch_size %d): each batch repeats rows; "
                        "lower optim.batch_size, or add rows", len(dataset), "" if len(dataset) == 1 else "s", cfg.optim.batch_size)
    return dataset


def warn_foreign_captions(cfg: TrainConfig, dataset) -> None:
    """A world's tiny base knows its world's words only: captions of other data (a user's own photos)
    reach it as subword fragments, which trains without complaint and learns nothing of them."""
    base = base_name(cfg.model.pretrained)  # a world base given by its folder too
    world = base_world(base)
    if world is None or cfg.data.source not in FILE_SOURCES:
        return
    captions = dataset.captions(32)
    foreign = [caption for caption in captions if not world.reads_prompt(caption)]
    if foreign:
        log.warning("%d of the first %d captions %s of the %s world (e.g. %r), and %s knows only its world's words; "
                    "for data of your own, set model.pretrained to a real model", len(foreign), len(captions),
                    "is not a prompt" if len(foreign) == 1 else "are not prompts", world.name, foreign[0], base)


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """What ``cfg.model`` is, from its config files alone (no weights read, no world base built)."""

    folder: str | None  # its pipeline folder or hub id; None for a world's base not built yet
    config: dict | None  # its model_index.json, where there is a folder
    video: bool  # it makes clips
    longest_clip: int | None  # the most frames its motion modules take, where a local config says


def model_files(cfg: TrainConfig) -> ModelFiles:
    """:class:`ModelFiles` of ``cfg.model``; a misspelt world base name is refused here."""
    name = cfg.model.pretrained
    if world := base_world(name):
        folder = world.existing_base(name, key="model.pretrained")
        folder = str(folder) if folder else None
        config = load_pipeline_config(folder) if folder else None
        video = world.clips
    else:
        check_not_a_misspelt_base(name, "model.pretrained")
        folder, config = name, load_pipeline_config(name, cfg.model.revision)
        video = "motion_adapter" in config or cfg.model.motion_adapter is not None
    return ModelFiles(folder, config, video, motion_frames_limit(folder, cfg.model.motion_adapter) if video and folder else None)


def check_launch(processes: int) -> None:
    """Refuse a launch whose processes accelerate runs each alone (``processes``: as it counts them):
    each would train a run of its own into one output_dir."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > processes:
        raise ConfigError(f"the launch started {launched} processes, but accelerate runs each alone (a distributed_type this machine cannot run: "
                          "MULTI_GPU where torch sees no GPU); on GPUs make them visible to torch, on a CPU launch with --multi_gpu and "
                          "ACCELERATE_USE_CPU=true (docs/coming-from-diffusers.md)")


def check_image_sizes(cfg: TrainConfig, family, denoiser_config: dict, vae_scale: int) -> None:
    """The training images' sizes (``data.resolution``, or ``data.buckets``' sizes) fit the denoiser."""
    data = cfg.data
    if not data.buckets:
        family.check_image_sizes(denoiser_config, vae_scale, [(data.resolution, data.resolution)], "data.resolution")
        return
    multiple = family.image_sides(denoiser_config, vae_scale)[0]
    check(data.bucket_step % multiple == 0, "data.bucket_step", f"{data.bucket_step} makes bucket sides {family.name} cannot take: "
          f"they must be multiples of {multiple} px (its latents' patches); set data.bucket_step to a multiple of {multiple}")
    family.check_image_sizes(denoiser_config, vae_scale, bucket_sizes(data.resolution, data.bucket_step, data.bucket_max_aspect), "data.resolution")


def warn_ignored_settings(cfg: TrainConfig, family, denoiser_config: dict) -> None:
    """One warning naming the settings changed from their defaults that this model ignores (a config
    written for another family), so that a user does not believe them applied. ``denoiser_config``:
    the denoiser's config (whether it has a guidance embedding)."""
    from sspo.models.families.flow import FlowConfig, FlowMatchingFamily

    ignored = []
    if not isinstance(family, FlowMatchingFamily) and cfg.flow != FlowConfig():
        ignored.append(f"flow.* (flow-matching models' keys; {family.name} is trained by denoising)")
    elif cfg.flow.guidance_scale != FlowConfig().guidance_scale and not family.takes_guidance_embedding(denoiser_config):
        ignored.append(f"flow.guidance_scale (a guidance embedding's input, as FLUX.1-dev has; this {family.name} model has none)")
    if cfg.generates_negatives and cfg.negatives.eta and cfg.negatives.scheduler != "ddim":
        ignored.append(f"negatives.eta (ddim's; negatives.scheduler is {cfg.negatives.scheduler})")
    if ignored:
        log.warning("ignored for this model: %s", "; ".join(ignored))


def check_model_fits(cfg: TrainConfig, files, warn: bool = False) -> None:
    """What the model's files (model_index.json, component configs; no weights) say of the config:
    its sampler, image sizes and LoRA targets, checked before any data is read; ``warn``: name the
    settings it ignores. A world's base is checked once it is shipped or cached."""
    if files.config is None:
        return
    family = family_of(files.config, cfg.model.family)
    revision = None if base_world(cfg.model.pretrained) else cfg.model.revision
    if warn:
        warn_ignored_settings(cfg, family, component_config(files.folder, files.config, family.denoiser_component, revision))
    if cfg.generates_negatives:
        family.check_sampler(cfg.negatives.scheduler)
    if files.video:  # a video denoiser is an image UNet joined to a motion adapter at load
        return
    denoiser = denoiser_skeleton(files.folder, files.config, family.denoiser_component, revision)
    vae_scale = vae_scale_factor(component_config(files.folder, files.config, "vae", revision))
    check_image_sizes(cfg, family, dict(denoiser.config), vae_scale)
    native = denoiser.config.get("sample_size")  # in latent pixels; FLUX's transformer states none
    if warn and isinstance(native, int) and not native * vae_scale / 2 <= cfg.data.resolution <= native * vae_scale * 2:
        log.warning("data.resolution %d is far from the %d px this model was made for (its denoiser's sample_size x its VAE's scale), "
                    "as a config written for another model would be: set data.resolution=%d, unless that size is meant",
                    cfg.data.resolution, native * vae_scale, native * vae_scale)
    if cfg.model.lora:
        family.lora_targets(denoiser, cfg.model.lora_targets, family.trained_modules(cfg.model.train_modules))


def check_frames(cfg: TrainConfig, video: bool, longest: int | None = None) -> None:
    """``data.frames`` fits what the model makes: clips of that many frames (``longest`` at most), or images (0)."""
    if video:
        check(cfg.data.frames > 0, "data.frames", "is 0 (images), but the model makes clips; set the frames per clip, e.g. data.frames=8")
        check(longest is None or cfg.data.frames <= longest, "data.frames",
              f"is {cfg.data.frames}, but this model's motion modules make clips of at most {longest} frames; set {longest} or fewer")
    else:
        check(not cfg.data.frames, "data.frames", f"is {cfg.data.frames} (clips), but the model makes images; set data.frames=0, "
              "or train a video model (model.motion_adapter)")


def validation_metric_prompts(cfg: TrainConfig, video: bool) -> list[str]:
    """The prompts ``validation.metrics`` scores, checked before training: readable, of the world a world's metric
    scores, sampled as the metrics' inputs (images or clips), and the scorers' local weights there."""
    from sspo.evaluation.evaluate import check_metric_prompts, check_scorers, scores_clips
    from sspo.evaluation.scorers import scorer_names
    from sspo.evaluation.scorers.prompts import read_prompt_file

    vcfg = cfg.validation
    if not (vcfg.metrics and vcfg.every_iterations):
        return []
    for metric in vcfg.metrics:
        if scores_clips(metric) != video:
            made, fits = "clips" if video else "images", ", ".join(name for name in scorer_names() if scores_clips(name) == video)
            raise ConfigError(f"validation.metrics: {metric!r} does not score the {made} this model makes; pick metrics of {made} ({fits})")
    if vcfg.prompt_file is None:
        prompts = list(vcfg.prompts)
    else:
        path = Path(vcfg.prompt_file).expanduser()
        if not path.is_file():
            raise DataError(f"validation.prompt_file {vcfg.prompt_file}: no such file; give a text file with one prompt per line")
        prompts = [item.prompt for item in read_prompt_file(path)]
        if not prompts:
            raise DataError(f"validation.prompt_file {vcfg.prompt_file} holds no prompts; write one prompt per line")
    check_metric_prompts(vcfg.metrics, prompts, "validation.prompt_file" if vcfg.prompt_file else "validation.prompts")
    check_scorers(vcfg.metrics, vcfg.scorer_paths, vcfg.scorer_options)
    return prompts


class Trainer(Checkpointing):
    """One run of ``cfg``: the model, its pairs and the loop; saving and resuming are :class:`Checkpointing`'s."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed

        cfg = resolved(cfg)
        check_environment(cfg)  # a Trainer made directly, not through train(), refuses what this machine lacks too
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.process_timeout_s))],
        )
        self._check_distributed()
        self._on_main(self._check_outputs_and_scorers)
        if resume:
            check_resumed_config(cfg, self.run_dir, self.accelerator.num_processes)
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        set_seed(cfg.seed)  # only model init (LoRA's A matrices) uses global RNG

        files = model_files(cfg)
        check_frames(cfg, files.video, files.longest_clip)  # before any row is read as an image or a clip
        check_model_fits(cfg, files, warn=self.accelerator.is_main_process)  # its warnings before a world renders its data
        self.dataset = open_dataset(cfg)
        self.data_digest = data_digest(cfg)  # saved with each state: a resume can tell data edited in place
        self._epoch_orders: dict[int, torch.Tensor] = {}  # epoch -> row order (_epoch_order)
        # With buckets a multiple of the batch: a micro-batch never spans two epochs, nor two buckets.
        self.epoch_length = self.dataset.epoch_length(cfg.optim.batch_size)
        self.items = MicroBatchReader(self.dataset, self._placements)

        self.base_model = resolve_model(cfg.model.pretrained, key="model.pretrained")
        self.pipe = load_pipeline(self.base_model, dtype=self.weight_dtype, revision=cfg.model.revision, variant=cfg.model.variant, motion_adapter=cfg.model.motion_adapter)
        self.pipe.to(self.device)
        self.family = family_of(self.pipe, cfg.model.family, cfg.flow)
        for name in self.family.frozen_components:
            if (component := self.family.component(name)) is not None:  # SD3 may be saved without T5
                component.requires_grad_(False).eval()
        check_frames(cfg, self.family.video, self.family.longest_clip)  # the model's frame limit, now that it is loaded
        if self.accelerator.is_main_process and files.config is None:  # a world's base built just now, which the check above could not read
            warn_ignored_settings(cfg, self.family, dict(self.family.denoiser.config))
        check_image_sizes(cfg, self.family, dict(self.family.denoiser.config), getattr(self.pipe, "vae_scale_factor", 8))
        self.metric_prompts = validation_metric_prompts(cfg, self.family.video)
        denoiser = self._prepare_denoiser(self.family.denoiser)

        self.pool = CheckpointPool(self.run_dir / "pool", self.family.denoiser_component) if cfg.uses_reference else None
        self.reference = ReferenceModel(denoiser, self.pool, cfg.model.lora, self.device, self.weight_dtype) if self.pool is not None else None
        self.latent_cache = self._latent_cache() if cfg.data.cache_latents else None
        uncond = self.family.encode_unconditional(self.device, cfg.data.resolution).to("cpu")
        self.pair_builder = PairBuilder(cfg, self.family, self.reference, uncond, self.read_rows, self._stream, self.device, self.accelerator.autocast)
        self.pair_builder.progress = cfg.pregenerate and self.accelerator.is_local_main_process

        self._prepare_optimization(denoiser)

        self.ssr_truth = None
        if cfg.diagnostics.ssr_truth_per_batch and cfg.generates_negatives and self.accelerator.is_main_process:
            self.ssr_truth = SSRTruth(cfg.diagnostics.ssr_truth_per_batch, self.run_dir, self.pair_builder, self.device, get_world(cfg.eval_world).evaluate)

        # Nothing in the output folder is moved or rewritten before this point: data, model and optimizer are set up first.
        self.global_step = 0
        self.nonfinite_skips = 0  # steps skipped for a non-finite loss or gradient (nonfinite: skip)
        self.example_prompt: str | None = None  # a prompt the last step trained on
        self.start_or_resume(resume)

        if self.accelerator.is_main_process:
            save_yaml(cfg, self.run_dir / "config.yaml")
            if cfg.report_to != "none":
                self._init_trackers()

    # ----------------------------------------------------------------------------------------------
    # Set-up

    def _prepare_optimization(self, denoiser) -> None:
        """The trained parameters, their optimizer, learning-rate schedule and moving average, prepared by accelerate."""
        from diffusers.optimization import get_scheduler

        cfg, o, processes = self.cfg, self.cfg.optim, self.accelerator.num_processes
        trained = {name: p for name, p in denoiser.named_parameters() if p.requires_grad}
        self.params, self.param_names = list(trained.values()), list(trained)
        optimizer = self._optimizer(self.params)
        # A prepared scheduler steps once per process at each optimizer step (accelerate's convention).
        lr_scheduler = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps * processes,
                                     num_training_steps=cfg.iterations * cfg.steps_per_iteration * processes, num_cycles=o.lr_num_cycles, power=o.lr_power)
        self.denoiser, self.optimizer, self.lr_scheduler = self.accelerator.prepare(denoiser, optimizer, lr_scheduler)
        self.ema = self._ema() if o.ema else None

    def _init_trackers(self) -> None:
        cfg = self.cfg
        scalars = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(dataclasses.asdict(cfg)).items()}
        # accelerate's tensorboard tracker logs to <logging_dir>/<project name>: the run's folder within the project's.
        project = cfg.tracker_project if cfg.report_to == "wandb" else f"{cfg.tracker_project}/{cfg.run_name}"
        init_kwargs = {"wandb": {"name": cfg.run_name, "id": self.tracker_run_id, "resume": "allow"}}
        if self.global_step:  # resumed: tensorboard hides what the stopped run logged after the state it resumes
            init_kwargs["tensorboard"] = {"purge_step": self.global_step + 1}
        self.accelerator.init_trackers(project, config=scalars, init_kwargs=init_kwargs)

    def _on_main(self, check: Callable[[], None]) -> None:
        """``check`` on the main process; its error stops every process at once (the others would
        wait for the main one at their next collective until the launcher kills them)."""
        from accelerate.utils import broadcast_object_list

        caught, failure = None, [None]  # the others get the main process's error line
        if self.accelerator.is_main_process:
            try:
                check()
            except Exception as exc:
                caught, failure = exc, [str(exc) if isinstance(exc, SSPOError) else f"the main process failed: {type(exc).__name__}: {exc}"]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(failure)
        if caught is not None:
            raise caught
        if failure[0] is not None:
            raise TrainingError(failure[0])

    def _check_outputs_and_scorers(self) -> None:
        """Main process: the output folder, before anything is written there (the others may see its
        files), and the validation metrics' reward models, which load once now rather than fail after an iteration."""
        check_output_dir(self.run_dir)
        vcfg = self.cfg.validation
        if vcfg.every_iterations:
            from sspo.evaluation.evaluate import check_scorers_load

            check_scorers_load(vcfg.metrics, vcfg.scorer_paths, vcfg.scorer_options, "set validation.scorer_paths.{metric} to local weights")

    def _check_distributed(self) -> None:
        from accelerate.utils import DistributedType

        check_launch(self.accelerator.num_processes)
        plugin = self.accelerator.state.deepspeed_plugin
        # accelerate's launch may ask for its own accumulation (its config file's gradient_accumulation_steps,
        # which `accelerate config` writes for DeepSpeed, passed on as $ACCELERATE_GRADIENT_ACCUMULATION_STEPS);
        # the loop accumulates optim's micro-batches. A DeepSpeed JSON's own value is set to optim's below.
        accum = self.cfg.optim.gradient_accumulation_steps
        if self.accelerator.gradient_accumulation_steps != accum:
            raise ConfigError(f"accelerate's launch asks for gradient accumulation {self.accelerator.gradient_accumulation_steps} (its config file's "
                              f"gradient_accumulation_steps, or $ACCELERATE_GRADIENT_ACCUMULATION_STEPS) and optim.gradient_accumulation_steps is "
                              f"{accum}; sspo accumulates optim.gradient_accumulation_steps: remove the launch's setting, or make the two equal")
        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise ConfigError(
                "FSDP is not supported: every process samples negatives and computes reference errors with a whole "
                "denoiser outside the sharded forward; launch with configs/accelerate/ddp.yaml, or deepspeed-zero2.yaml to shard optimizer state"
            )
        if plugin is not None:
            if plugin.zero_stage == 3:
                raise ConfigError("DeepSpeed ZeRO-3 shards the denoiser's weights, which sampling negatives needs whole; use ZeRO-2 (configs/accelerate/deepspeed-zero2.yaml)")
            # DeepSpeed applies each update inside backward(), before sspo sees the loss or the norm.
            check(self.cfg.nonfinite == "error", "nonfinite", "skip is not available under DeepSpeed, which updates the weights inside its "
                  "backward pass, before a non-finite loss is seen; set nonfinite: error, and on a stop lower optim.learning_rate and --resume")
            # DeepSpeed reads the micro-batch size from a prepared DataLoader, and sspo has none; it
            # clips gradients in its own step, at its config's value.
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.cfg.optim.batch_size
            plugin.deepspeed_config["gradient_accumulation_steps"] = accum
            plugin.deepspeed_config["gradient_clipping"] = self.cfg.optim.max_grad_norm

    def _prepare_denoiser(self, denoiser):
        mcfg = self.cfg.model
        trained = self.family.trained_modules(mcfg.train_modules)
        if mcfg.attention == "xformers":
            denoiser.enable_xformers_memory_efficient_attention()
        if mcfg.lora:
            from peft import LoraConfig

            targets = self.family.lora_targets(denoiser, mcfg.lora_targets, trained)
            denoiser.requires_grad_(False).to(self.weight_dtype)
            denoiser.add_adapter(LoraConfig(r=mcfg.lora_rank, lora_alpha=mcfg.lora_alpha, init_lora_weights="gaussian", target_modules=targets), adapter_name=POLICY)
            for p in denoiser.parameters():  # trainable LoRA weights stay fp32 under mixed precision
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            denoiser.to(torch.float32).requires_grad_(True)
            self.family.freeze_untrained(denoiser, trained)
        if mcfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        return denoiser

    def _latent_cache(self) -> LatentCache:
        """Every row's latents and text condition (sspo/training/latent_cache.py), encoded now if not cached yet."""
        key = cache_key(self.cfg, self.base_model, self.family, len(self.dataset), self.data_digest)
        root = self.cfg.data.cache_dir or default_dir(key)
        return LatentCache.build(self.family, self.dataset, key, root, self.device, self.cfg.optim.batch_size, self.cfg.data.resolution, self.accelerator)

    def _optimizer(self, params):
        o = self.cfg.optim
        if o.use_8bit_adam:
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit
        else:
            cls = torch.optim.AdamW
        return cls(params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay, eps=o.adam_epsilon)

    def _ema(self):
        from diffusers.training_utils import EMAModel

        # The trained weights only: the frozen rest never changes. The averaged weights are saved through
        # the family's save_full (copy_to, then save), not EMAModel.save_pretrained, which needs every weight.
        return EMAModel(self.params, decay=self.cfg.optim.ema_decay)

    @property
    def policy(self):
        return self.accelerator.unwrap_model(self.denoiser)

    @property
    def micro_batches_per_iteration(self) -> int:
        return self.cfg.steps_per_iteration * self.cfg.optim.gradient_accumulation_steps

    # ----------------------------------------------------------------------------------------------
    # Pairs

    def _placements(self, m: int) -> list[tuple[int, int]]:
        """(row, epoch) of micro-batch ``m`` on this process: a seeded permutation per epoch."""
        b, world = self.cfg.optim.batch_size, self.accelerator.num_processes
        n = self.epoch_length
        first = (m * world + self.accelerator.process_index) * b
        placed = [divmod(position, n) for position in range(first, first + b)]
        return [(int(self._epoch_order(epoch)[offset]), epoch) for epoch, offset in placed]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        # Kept per trainer (a functools.lru_cache on the method would keep every trainer, models
        # included, alive in a class-level cache). Two epochs are kept, never evicting the one asked
        # for: a micro-batch larger than the data spans several, and may be placed again.
        orders = self._epoch_orders
        if epoch not in orders:
            orders[epoch] = self.dataset.epoch_order(epoch, self.cfg.seed, self.cfg.optim.batch_size)
            while len(orders) > 2:
                del orders[min(e for e in orders if e != epoch)]
        return orders[epoch]

    @torch.no_grad()
    def read_rows(self, m: int) -> Rows:
        """Micro-batch ``m``'s winners (and dataset losers) as latents, with their prompts' text condition."""
        dataset_losers = self.cfg.spec.needs_dataset_losers
        if self.latent_cache is not None:  # data.cache_latents: encoded once, before training
            prompts, cond, winners, losers = self.latent_cache.rows([row for row, _ in self._placements(m)])
        else:
            prompts, cond, winners, losers = encode_rows(self.family, self.items(m), self.device, self.cfg.data.resolution, losers=dataset_losers)
        return Rows(prompts, cond, winners, losers if dataset_losers else None)

    def _stream(self, m: int) -> int:
        """The random stream of micro-batch ``m`` on this process (docs/method.md "Pairs")."""
        return m * self.accelerator.num_processes + self.accelerator.process_index

    def iteration_pairs(self, indices: list[int]) -> list[PairBatch]:
        """pregenerate: an iteration's pairs up front, negatives grouped by checkpoint; with
        cache_reference_errors their reference errors too, and the reference leaves the accelerator."""
        batches = self.pair_builder.build(indices, with_reference=self.cfg.cache_reference_errors)
        if self.reference is not None and self.cfg.cache_reference_errors:
            self.reference.offload()  # the policy steps of this iteration never need it
        return batches

    # ----------------------------------------------------------------------------------------------
    # The step

    def loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict]:
        dev, rows, draws = self.device, batch.rows, batch.draws
        if not self.cfg.uses_reference:  # SFT: the winners only
            errors = self.family.denoising_errors(self.denoiser, rows.winners.to(dev), draws.noise.to(dev), draws.timesteps.to(dev), rows.cond)
            return self.cfg.spec.loss(errors)
        policy_w, policy_l = pair_errors(self.family, self.denoiser, rows.winners, batch.losers, draws.noise, draws.timesteps, rows.cond, dev)
        ref = batch.reference
        switch = None
        if draws.switch_noise is not None:  # ssr_draws > 1: K from errors averaged over more draws
            policy_mean = mean_over_draws(self.family, self.denoiser, policy_w, rows.winners, draws.switch_timesteps, draws.switch_noise, rows.cond, dev)
            switch = (policy_mean, ref.switch.to(dev))
        loss, metrics = self.cfg.spec.loss(policy_w, policy_l, ref.winners.to(dev), ref.losers.to(dev), self.cfg.beta, self.cfg.effective_ssr, switch)
        # The mean pool index of the checkpoints that were this micro-batch's reference.
        metrics["reference_checkpoint"] = torch.tensor(sum(draws.checkpoints) / len(draws.checkpoints), dtype=torch.float32)
        return loss, metrics

    def optimizer_step(self, batches: list[PairBatch]) -> dict[str, float]:
        totals: dict[str, float] = {}
        accum = len(batches)
        # A prompt of the run's own data, for the model card's example (a dropped caption is "").
        self.example_prompt = next((p for b in batches for p in b.rows.prompts if p), self.example_prompt)
        for batch in batches:
            # Divides the loss by accum; gradients are synchronised across processes (and DeepSpeed
            # steps) on the last micro-batch only.
            with self.accelerator.accumulate(self.denoiser):
                loss, metrics = self.loss(batch)
                self.accelerator.backward(loss)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value) / accum
        norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)  # DeepSpeed: clips in its step
        local_loss = totals["loss"]
        # Each process has its own loss, and all must take the same branch below (or one would stop
        # or skip while the others wait for it, or their fp16 scalers drift apart); the logged
        # metrics are the whole batch's, every process's micro-batches.
        finite_loss = self._mean_over_processes(totals)
        totals["grad_norm"] = float("nan") if norm is None else float(norm)
        # Under fp16 loss scaling an overflowing gradient is routine: the scaler skips that step and lowers its scale.
        scaler = self.accelerator.scaler
        if finite_loss and (norm is None or math.isfinite(totals["grad_norm"]) or scaler is not None):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.step(self.params)
        elif self.cfg.nonfinite == "skip":
            self.nonfinite_skips += 1
            if scaler is not None:  # clipping unscaled this step's gradients: the scaler must close the step (and lowers its scale)
                scaler.update()
        else:
            last = latest_state(self.run_dir)
            raise TrainingError(
                f"method {self.cfg.method}, step {self.global_step + 1}: non-finite loss or gradient norm (loss {local_loss} in this process, "
                f"gradient norm {totals['grad_norm']}), nothing saved from it; the last good state is {last or 'none (no state saved yet)'}: "
                f"lower optim.learning_rate{'' if self.accelerator.state.deepspeed_plugin else ', or set nonfinite: skip to skip such steps'}, "
                "and run again with --resume"
            )
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        totals["lr"] = self.lr_scheduler.get_last_lr()[0]
        if self.cfg.nonfinite == "skip":
            totals["nonfinite_skips"] = self.nonfinite_skips
        if scaler is not None:
            totals["loss_scale"] = scaler.get_scale()
        return totals

    def _mean_over_processes(self, metrics: dict[str, float]) -> bool:
        """Replace each of ``metrics`` by its mean over the processes; whether every process's loss was finite."""
        keys = sorted(metrics)
        local = torch.tensor([metrics[k] for k in keys], dtype=torch.float64 if self.accelerator.num_processes > 1 else torch.float32,
                             device=self.device)  # MPS has no float64, and one process needs no more than its own values
        every = self.accelerator.gather(local[None]).reshape(-1, len(keys))
        if self.accelerator.num_processes > 1:
            metrics.update(zip(keys, every.mean(0).tolist(), strict=True))
        return bool(every[:, keys.index("loss")].isfinite().all())

    # ----------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> Path:
        cfg = self.cfg
        accum = cfg.optim.gradient_accumulation_steps
        total = cfg.iterations * cfg.steps_per_iteration
        started, first_step, metrics = time.monotonic(), self.global_step, None
        # Closed on an error too, so that the error is printed on a line of its own.
        # smoothing=0: the rate is the mean since the start, which counts the negatives' sampling and
        # validation between steps once an iteration has passed (a moving average saw one slow step as the pace).
        with tqdm(total=total, initial=self.global_step, desc=f"{cfg.method}", smoothing=0, disable=not self.accelerator.is_local_main_process) as bar:
            finished, step_in_iteration = divmod(self.global_step, cfg.steps_per_iteration)
            if finished and not step_in_iteration and self._validates_after(finished - 1) and not self.validated():
                bar.set_postfix_str("validating")  # resumed from a state whose validation was stopped
                self.validate()
            while self.global_step < total:
                iteration, step_in_iteration = divmod(self.global_step, cfg.steps_per_iteration)
                start, last = iteration * self.micro_batches_per_iteration, (iteration + 1) * self.micro_batches_per_iteration
                first = start + step_in_iteration * accum  # after a resume within the iteration, its first micro-batch not yet trained
                # Pregenerated from the iteration's start even then: generation batches span micro-batches,
                # and other batches would round the negatives differently from an uninterrupted run.
                if cfg.pregenerate and cfg.generates_negatives:
                    bar.set_postfix_str(f"sampling iteration {iteration}'s negatives")
                pregenerated = self.iteration_pairs(list(range(start, last))) if cfg.pregenerate else None
                for m in range(first, last, accum):
                    batches = pregenerated[m - start : m - start + accum] if pregenerated else self.pair_builder.build(list(range(m, m + accum)))
                    batches = self.pair_builder.complete(batches)
                    if self.ssr_truth is not None:
                        with self._sampling():
                            self.ssr_truth.observe(batches, self.policy, iteration, self.global_step + 1)
                    metrics = self.optimizer_step(batches)
                    fault_point("step")
                    metrics.update(iteration=iteration, pool_size=len(self.pool) if self.pool is not None else 0)
                    self._log(metrics)
                    bar.update(1)
                    bar.set_postfix(_postfix(metrics, cfg))
                    if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0 and self.global_step % cfg.steps_per_iteration:
                        self.save_state()
                self.end_iteration(iteration, bar)
        self._report_replaced_rows()
        final = self.save_final()
        self.accelerator.end_training()
        if self.accelerator.is_main_process:
            tail = f", last loss {metrics['loss']:.4f}" if metrics else ""
            if self.nonfinite_skips:  # each skipped step was one warning; the summary counts them
                tail += f"; {self.nonfinite_skips} of {self.global_step} skipped for a non-finite loss or gradient"
            steps = self.global_step - first_step
            if steps:
                log.info("%s finished: %d optimizer step%s in %.0f s%s; the final model is %s", cfg.method, steps, "" if steps == 1 else "s",
                         time.monotonic() - started, tail, final)
            else:  # a finished run resumed
                log.info("%s had already finished all %d optimizer steps (raise iterations to train on); the final model is %s", cfg.method, total, final)
        return final

    def _report_replaced_rows(self) -> None:
        """One line at the end for the unreadable rows each named in a warning as met (by every process,
        while reading micro-batches or encoding the latent cache; DataLoader workers' rows once reported)."""
        from accelerate.utils import gather_object

        replaced = len(set(gather_object(sorted(self.dataset.skipped_rows))))  # a row several processes met is one row
        if replaced and self.accelerator.is_main_process:
            log.warning("%d unreadable row%s skipped in this run (since it started or resumed), each replaced by the next readable "
                        "row; the warnings above name them", replaced, " was" if replaced == 1 else "s were")

    def end_iteration(self, iteration: int, bar: tqdm) -> None:
        bar.set_postfix_str("saving")
        if self.cfg.generates_negatives:
            if self.accelerator.is_main_process:
                with disk_errors(f"pool checkpoint {len(self.pool)} in {self.pool.root}"):
                    self.pool.add(self.reference.policy_state(), step=self.global_step)  # theta_n
            self._sync_pool()
        # The save before validation: a run stopped or failing while it validates (a scheduler's
        # SIGTERM, a scorer, memory) keeps the iteration's training, and its resume validates first.
        self.save_state()
        if self._validates_after(iteration):
            bar.set_postfix_str("validating")  # a stop from here on keeps the iteration
            self.validate()

    def _validates_after(self, iteration: int) -> bool:
        every = self.cfg.validation.every_iterations
        return bool(every) and ((iteration + 1) % every == 0 or iteration + 1 == self.cfg.iterations)

    # ----------------------------------------------------------------------------------------------
    # Logging and validation

    def _log(self, metrics: dict) -> None:
        self.accelerator.log({f"train/{k}": v for k, v in metrics.items()}, step=self.global_step)
        if self.accelerator.is_main_process and self.global_step % self.cfg.log_every == 0:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.global_step, **metrics}) + "\n")

    def validate(self) -> dict:
        """On the main process, with the weights the final model will hold: a grid of the fixed prompts,
        the mean of every ``validation.metrics`` column over its prompts and a world's exact scores if
        asked; the scores go to the trackers and ``validation.jsonl``."""
        if not self.accelerator.is_main_process:
            return {}
        vcfg, scores = self.cfg.validation, {}
        with self.averaged_weights():
            samples = self._sample(vcfg.prompts) if vcfg.prompts else []
            if samples:
                self.validation_grid(samples)
            if vcfg.metrics:
                if vcfg.prompt_file is not None:
                    samples = self._sample(self.metric_prompts)
                scores |= self.metric_scores(samples)
            if vcfg.world_eval:
                scores |= self.world_eval()
        if scores:
            self.accelerator.log({f"validation/{k}": v for k, v in scores.items()}, step=self.global_step)
            with open(self.run_dir / "validation.jsonl", "a") as f:
                f.write(json.dumps({"step": self.global_step, **scores}) + "\n")
            log.info("validation at step %d: %s", self.global_step, ", ".join(f"{key} {value:.3f}" for key, value in scores.items()))
        return scores

    @contextlib.contextmanager
    def averaged_weights(self):
        """With ``optim.ema``, the policy holds the moving average in the block and its trained weights, bitwise, after it."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    @contextlib.contextmanager
    def _sampling(self):
        self.policy.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                yield
        finally:
            self.policy.train()

    def _sample(self, prompts) -> list:
        """One sample of each prompt with the policy, seeded by ``validation.seed``: the pipeline's own
        sampler, as ``sspo eval``'s, at the negatives' steps and guidance."""
        from sspo.evaluation.sampling import generate

        sampler = self.cfg.negatives
        with self._sampling():
            samples = generate(self.pipe, prompts, [self.cfg.validation.seed] * len(prompts), steps=sampler.steps, guidance_scale=sampler.guidance_scale,
                               size=self.cfg.data.resolution, frames=self.cfg.data.frames)
        fault_point("validation")
        return samples

    def validation_grid(self, samples: list) -> Path:
        """The samples of ``validation.prompts``: a PNG in the run dir and a tensorboard image (for clips,
        their middle frames; the whole clips beside it as a GIF)."""
        from sspo.evaluation.sampling import clip_grid, image_grid, save_animation, save_image

        prompts = self.cfg.validation.prompts
        name = validation_grid_stem(self.run_dir, self.global_step)
        if self.family.video:
            frames = clip_grid([samples], [f"step {self.global_step}"], prompts)
            save_animation(frames, name.with_suffix(".gif"))
            grid = frames[len(frames) // 2]
        else:
            grid = image_grid([samples], [f"step {self.global_step}"], prompts)
        if self.cfg.report_to == "tensorboard":
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image("validation/grid", np.asarray(grid), self.global_step, dataformats="HWC")
        return save_image(grid, name.with_suffix(".png"))

    def metric_scores(self, samples: list) -> dict[str, float]:
        """Every column of ``validation.metrics`` averaged over the samples of :attr:`metric_prompts`, the samples sent to the tracker."""
        from sspo.evaluation.evaluate import score_images

        vcfg = self.cfg.validation
        with torch.no_grad():
            scores = score_images(samples, self.metric_prompts, vcfg.metrics, device=self.device, scorer_paths=vcfg.scorer_paths, scorer_options=vcfg.scorer_options)
        if self.cfg.report_to != "none":
            stills = np.stack([s[len(s) // 2] if isinstance(s, np.ndarray) else np.asarray(s) for s in samples])  # a clip: its middle frame
            options = {"dataformats": "NHWC"} if self.cfg.report_to == "tensorboard" else {}
            self.accelerator.get_tracker(self.cfg.report_to).log_images({"validation/samples": stills}, step=self.global_step, **options)
        return {column: float(np.mean(values)) for column, values in scores.items()}

    def world_eval(self) -> dict:
        """The exact rewards of the world the config names (``cfg.eval_world``) on its seen and
        held-out prompts, sampled as :meth:`_sample` samples."""
        from sspo.evaluation.evaluate import EvalConfig, evaluate_pipeline

        vcfg, data, sampler = self.cfg.validation, self.cfg.data, self.cfg.negatives
        eval_cfg = EvalConfig(prompts=self.cfg.eval_world, split_seed=data.world_split_seed, prompts_per_split=vcfg.prompts_per_split,
                              seeds=(vcfg.seed,), steps=sampler.steps, guidance_scale=sampler.guidance_scale, frames=data.frames or 8)
        with self._sampling():
            summary, _ = evaluate_pipeline(self.pipe, eval_cfg)
        fault_point("validation")
        return {f"reward_{split}": scores[eval_cfg.metric_names[0]] for split, scores in summary.items()}


def _postfix(metrics: dict, cfg: TrainConfig) -> dict:
    """The bar's numbers: the loss; with SSR, the share of pairs whose switch fired (``ssr_rate``); with
    self-sampling, the mean pool checkpoint that sampled the negatives, of the newest."""
    shown = {"loss": f"{metrics['loss']:.4f}"}
    if cfg.effective_ssr != "off" and "ssr_rate" in metrics:
        shown["ssr_rate"] = f"{metrics['ssr_rate']:.2f}"
    if cfg.generates_negatives:
        shown["checkpoint"] = f"{metrics['reference_checkpoint']:.1f}/{metrics['pool_size'] - 1}"
    return shown


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train ``cfg`` in its output folder, checked and locked for the run (sspo/training/run_folder.py): a second run
    into a live run's folder is refused, a fresh start over a finished run only with ``overwrite``, and a run that
    fails before its first saved state leaves the folder as it was."""
    cfg = resolved(cfg)
    check_environment(cfg)
    # The main process holds the lock (claimed checks the folder first); the others write nothing the
    # main process does not wait for, and check the folder too, so a refusal stops them all.
    if launched_as_main():
        with claimed(cfg.output_dir):  # a run live in the folder is named before a finished one is
            check_finished_run_kept(cfg.output_dir, resume, overwrite)
            return Trainer(cfg, resume=resume).train()
    check_output_dir(cfg.output_dir, beside_main=True)
    check_finished_run_kept(cfg.output_dir, resume, overwrite)
    return Trainer(cfg, resume=resume).train()


def check_finished_run_kept(output_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse a fresh start that would replace a finished run's results (its ``final/``) unasked: two
    experiments given the same output_dir (a config's default) would otherwise keep only the last.
    A finished run a killed start set aside counts: the next start puts it back."""
    final = Path(output_dir) / "final"
    kept = resumed_folder(Path(output_dir)) / "final"
    if not resume and not overwrite and kept.is_dir() and not kept.is_symlink():
        raise ConfigError(f"output_dir {output_dir} holds a finished run ({final}), which a fresh start would replace; choose another "
                          "output_dir, pass --resume to continue it (raise iterations to train on), or --overwrite to replace it")


def launched_as_main() -> bool:
    """Whether this is the main process of a launch (or no launch): the process of rank 0, which the
    launchers (torchrun, accelerate, deepspeed) set in RANK. An accelerate state made before the
    Accelerator would miss the launch's CPU flag."""
    return int(os.environ.get("RANK", "0")) == 0


def dry_run(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> str:
    """A summary of the run ``cfg`` describes (``resume``: continued from the saved state the real
    resume takes, whose files it reads to check them), once its data and model config open (no
    weights load)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from sspo.training.model_card import effective_batch, run_settings

    unset = {"beta": cfg.beta is None, "negatives.scheduler": cfg.negatives.scheduler is None, "negatives.guidance_scale": cfg.negatives.guidance_scale is None}
    cfg = resolved(cfg)
    check_environment(cfg)
    check_output_dir(cfg.output_dir)
    check_finished_run_kept(cfg.output_dir, resume, overwrite)
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).num_processes  # as the Accelerator counts them
    check_launch(processes)
    resumed = resumed_folder(Path(cfg.output_dir))
    if resume:
        check_resumed_config(cfg, resumed, processes)
    name, files = cfg.model.pretrained, model_files(cfg)
    video, world = files.video, base_world(name)
    check_model_fits(cfg, files, warn=True)
    dataset = open_dataset(cfg, read_first_row=False)
    if world:
        model = f"{name} (the {world.name} world's {world.pipeline_of(name)}, shipped or built and cached on first use)"
    else:
        model = f"{name} ({files.config['_class_name']}{' + motion adapter ' + cfg.model.motion_adapter if cfg.model.motion_adapter else ''})"
    check_frames(cfg, video, files.longest_clip)
    validation_metric_prompts(cfg, video)
    rows = {"model": model, **run_settings(cfg, processes, video)}
    values = {"beta": (f"{cfg.beta:g}", cfg.uses_reference), "negatives.scheduler": (cfg.negatives.scheduler, cfg.generates_negatives),
              "negatives.guidance_scale": (f"{cfg.negatives.guidance_scale:g}", cfg.generates_negatives)}
    defaulted = [f"{key}={values[key][0]}" for key, is_unset in unset.items() if is_unset and values[key][1]]
    if defaulted:  # not the user's choice: the summary says so, since another model family changes them
        rows["defaults"] = f"{', '.join(defaulted)}: left unset, so the model's usual value{'s' if len(defaulted) > 1 else ''}"
    items = cfg.iterations * cfg.steps_per_iteration * effective_batch(cfg, processes)
    # Integers, since a float overflows for a batch of 400 digits, which the config admits.
    epochs = f"{items / len(dataset):.2f}" if items < 10**15 else f"about 10^{len(str(items // len(dataset))) - 1}"
    rows["data"] += (f"; {len(dataset)} row{'' if len(dataset) == 1 else 's'} of {'pairs' if dataset.has_losers else 'single clips' if video else 'single images'}, "
                     f"{epochs} epochs")
    rows["output"] = cfg.output_dir
    if resume:
        state = resume_point(resumed, resumed / "pool" if cfg.uses_reference else None)
        earlier = " (the earlier run, which a start stopped before its first save set aside, is put back first)" if resumed != Path(cfg.output_dir) else ""
        rows["resume"] = f"from {Path(cfg.output_dir) / state.relative_to(resumed)}{earlier}" if state else "nothing saved there yet: starts afresh"
    return "dry run: config, data and model OK\n" + "\n".join(f"  {key:<12} {value}" for key, value in rows.items())
