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
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sspo.config import load_yaml, save_yaml
from sspo.training.data import load_dataset_from_config
from sspo.errors import ConfigError, DataError, TrainingError
from sspo.training.faults import fault_point
from sspo.io import DamagedFileError, atomic_write_json, atomic_write_text, read_jsonl
from sspo.training.latent_cache import LatentCache, cache_key, default_dir, encode_rows
from sspo.training.losses import sft_loss, sspo_loss
from sspo.training.methods import METHODS
from sspo.models.lora_targets import check_lora_targets
from sspo.worlds import base_world
from sspo.worlds.names import resolve_model
from sspo.models.pipeline import denoising_errors, encode_unconditional, is_video, load_pipeline, load_pipeline_config, motion_adapter_of, trained_modules
from sspo.training.pairs import PairBatch, PairBuilder, Rows, mean_over_draws
from sspo.training.pool import CheckpointPool
from sspo.training.reference import POLICY, ReferenceModel
from sspo.training.run_folder import check_output_dir, claimed, discard_previous, start_fresh
from sspo.training.run_state import HARMLESS_KEYS, STATE_FILE, config_differences, flatten, manifest, manifest_problems, read_state, saved_states
from sspo.training.ssr_truth import FILE as SSR_TRUTH_FILE
from sspo.training.ssr_truth import SSRTruth
from sspo.training.config import TrainConfig, check_environment

log = logging.getLogger(__name__)


def open_dataset(cfg: TrainConfig):
    """The training data, checked against what ``cfg.method`` needs from it and to hold a readable row."""
    dataset = load_dataset_from_config(cfg.data)
    if cfg.spec.needs_dataset_losers and not dataset.has_losers:
        others = "/".join(m.name for m in METHODS.values() if not m.needs_dataset_losers)
        raise DataError(f"method {cfg.method!r} needs (winner, loser) pairs, but data.path {cfg.data.path} has single images; use a Pick-a-Pic-style parquet or method {others}")
    dataset[0]  # the first readable row, or a DataError when no row reads (files all missing, say): before training starts
    return dataset


def latest_checkpoint(run_dir: Path) -> Path | None:
    states = saved_states(run_dir)
    return states[-1] if states else None


@contextlib.contextmanager
def disk_errors(what: str, staging: Path | None = None):
    """A failed write (a full disk, a read-only folder) as one clear error, its half-written ``staging`` removed."""
    try:
        yield
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise TrainingError(
            f"could not write {what}: {exc.strerror or exc} ({exc.filename or staging}); earlier saved states are intact: "
            "free disk space or fix the folder's permissions, then run again with --resume"
        ) from None


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
        )
        if self.accelerator.is_main_process:  # before it writes anything there (the others may see its files)
            check_output_dir(self.run_dir)
        self._check_distributed()
        if resume:
            self._check_resumed_config()
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        set_seed(cfg.seed)  # only model init (LoRA's A matrices) uses global RNG

        self.dataset = open_dataset(cfg)
        self._epoch_orders: dict[int, torch.Tensor] = {}  # epoch -> row order (_epoch_order)

        self.base_model = resolve_model(cfg.model.pretrained)
        self.pipe = load_pipeline(self.base_model, dtype=self.weight_dtype, revision=cfg.model.revision, variant=cfg.model.variant, motion_adapter=cfg.model.motion_adapter)
        self.pipe.to(self.device)
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        unet = self._prepare_unet(self.pipe.unet)
        from diffusers import DDPMScheduler

        self.train_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)

        self.pool = CheckpointPool(self.run_dir / "pool") if cfg.uses_reference else None
        self.reference = ReferenceModel(unet, self.pool, cfg.model.lora, self.device, self.weight_dtype) if self.pool is not None else None
        self.latent_cache = self._latent_cache() if cfg.data.cache_latents else None
        uncond = encode_unconditional(self.pipe, self.device, cfg.data.resolution).to("cpu")
        self.pair_builder = PairBuilder(cfg, self.pipe, self.reference, self.train_scheduler, uncond, self.read_rows, self._stream, self.device, self.accelerator.autocast)

        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = self._optimizer(params)
        from diffusers.optimization import get_scheduler

        # A prepared scheduler steps once per process at each optimizer step (accelerate's convention).
        lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.optim.lr_warmup_steps * self.accelerator.num_processes)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(unet, optimizer, lr_scheduler)
        self.params = params

        self.ssr_truth = None
        if cfg.diagnostics.ssr_truth_per_batch and cfg.generates_negatives and self.accelerator.is_main_process:
            self.ssr_truth = SSRTruth(cfg.diagnostics.ssr_truth_per_batch, self.run_dir, self.pipe, self.train_scheduler, self.pair_builder, self.device)

        # Nothing in the output folder is moved or rewritten before this point: data, model and optimizer are set up first.
        self.global_step = 0
        self.nonfinite_skips = 0  # steps skipped for a non-finite loss or gradient (nonfinite: skip)
        state_dir = self._resumable_state() if resume else None
        if state_dir is not None:
            self._load_state(state_dir)
        else:
            self._start_fresh()

        if self.accelerator.is_main_process:
            save_yaml(cfg, self.run_dir / "config.yaml")
            if cfg.report_to != "none":
                scalars = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(dataclasses.asdict(cfg)).items()}
                self.accelerator.init_trackers("sspo", config=scalars)

    # ----------------------------------------------------------------------------------------------
    # Set-up

    def _check_distributed(self) -> None:
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise ConfigError(
                "FSDP is not supported: every process samples negatives and computes reference errors with a whole "
                "UNet outside the sharded forward; launch with configs/accelerate/ddp.yaml, or deepspeed-zero2.yaml to shard optimizer state"
            )
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None:
            if plugin.zero_stage == 3:
                raise ConfigError("DeepSpeed ZeRO-3 shards the UNet's weights, which sampling negatives needs whole; use ZeRO-2 (configs/accelerate/deepspeed-zero2.yaml)")
            # DeepSpeed reads the micro-batch size from a prepared DataLoader, and sspo has none.
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.cfg.optim.batch_size

    def _check_resumed_config(self) -> None:
        """A resumed run must compute what the saved one did: result-changing keys may not differ."""
        saved = self.run_dir / "config.yaml"
        if latest_checkpoint(self.run_dir) is None or not saved.is_file():
            return  # nothing to resume: the run starts from scratch
        differences = config_differences(load_yaml(saved), dataclasses.asdict(self.cfg))
        if differences:
            raise ConfigError(
                f"--resume: the config differs from the one {self.run_dir} was trained with ({'; '.join(differences)}); "
                f"set those keys back, or train into a new output_dir (only {', '.join(HARMLESS_KEYS)} may change)"
            )

    def _prepare_unet(self, unet):
        mcfg = self.cfg.model
        motion_only = trained_modules(self.pipe, mcfg.train_modules) == "motion"
        if mcfg.attention == "xformers":
            unet.enable_xformers_memory_efficient_attention()
        if mcfg.lora:
            from peft import LoraConfig

            check_lora_targets(unet, mcfg.lora_targets, motion_only)
            targets = lora_target_modules(mcfg.lora_targets, motion_only)
            unet.requires_grad_(False).to(self.weight_dtype)
            unet.add_adapter(LoraConfig(r=mcfg.lora_rank, lora_alpha=mcfg.lora_alpha, init_lora_weights="gaussian", target_modules=targets), adapter_name=POLICY)
            for p in unet.parameters():  # trainable LoRA weights stay fp32 under mixed precision
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            unet.to(torch.float32).requires_grad_(True)
            if motion_only:
                unet.freeze_unet2d_params()
        if mcfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        return unet

    def _latent_cache(self) -> LatentCache:
        """Every row's latents and text condition (sspo/training/latent_cache.py), encoded now if not cached yet."""
        key = cache_key(self.cfg, self.base_model, self.pipe, len(self.dataset))
        root = self.cfg.data.cache_dir or default_dir(key)
        return LatentCache.build(self.pipe, self.dataset, key, root, self.device, self.cfg.optim.batch_size, self.cfg.data.resolution, self.accelerator)

    def _optimizer(self, params):
        o = self.cfg.optim
        if o.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ConfigError("config key 'optim.use_8bit_adam' needs bitsandbytes: pip install 'sspo[bnb]'") from None
            cls = bnb.optim.AdamW8bit
        else:
            cls = torch.optim.AdamW
        return cls(params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay, eps=o.adam_epsilon)

    @property
    def policy(self):
        return self.accelerator.unwrap_model(self.unet)

    @property
    def micro_batches_per_iteration(self) -> int:
        return self.cfg.steps_per_iteration * self.cfg.optim.gradient_accumulation_steps

    # ----------------------------------------------------------------------------------------------
    # Pairs

    def _indices(self, m: int) -> list[tuple[int, int]]:
        """(row, epoch) of micro-batch ``m`` on this process: a seeded permutation per epoch."""
        b, world, n = self.cfg.optim.batch_size, self.accelerator.num_processes, len(self.dataset)
        first = (m * world + self.accelerator.process_index) * b
        placed = [divmod(position, n) for position in range(first, first + b)]
        return [(int(self._epoch_order(epoch)[offset]), epoch) for epoch, offset in placed]

    def _item(self, row: int, epoch: int) -> dict:
        self.dataset.set_epoch(epoch)  # random crops and flips differ per epoch, reproducibly
        return self.dataset[row]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        # Kept per trainer (a functools.lru_cache on the method would keep every trainer, models
        # included, alive in a class-level cache); a micro-batch spans at most two epochs.
        orders = self._epoch_orders
        if epoch not in orders:
            orders[epoch] = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            while len(orders) > 2:
                del orders[min(orders)]
        return orders[epoch]

    @torch.no_grad()
    def read_rows(self, m: int) -> Rows:
        """Micro-batch ``m``'s winners (and dataset losers) as latents, with their prompts' text condition."""
        placed, dataset_losers = self._indices(m), self.cfg.spec.needs_dataset_losers
        if self.latent_cache is not None:  # data.cache_latents: encoded once, before training
            prompts, cond, winners, losers = self.latent_cache.rows([row for row, _ in placed])
        else:
            items = [self._item(row, epoch) for row, epoch in placed]
            prompts, cond, winners, losers = encode_rows(self.pipe, items, self.device, self.cfg.data.resolution, losers=dataset_losers)
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
            errors = denoising_errors(self.unet, self.train_scheduler, rows.winners.to(dev), draws.noise.to(dev), draws.timesteps.to(dev), rows.cond)
            return sft_loss(errors)
        # Winner and loser of every pair in one forward.
        latents = torch.cat([rows.winners, batch.losers]).to(dev)
        noise = draws.noise.repeat(2, *[1] * (latents.ndim - 1)).to(dev)
        errors = denoising_errors(self.unet, self.train_scheduler, latents, noise, draws.timesteps.repeat(2).to(dev), rows.cond.repeat(2))
        policy_w, policy_l = errors.chunk(2)
        ref = batch.reference
        switch = None
        if draws.switch_noise is not None:  # ssr_draws > 1: K from errors averaged over more draws
            policy_mean = mean_over_draws(self.unet, self.train_scheduler, policy_w, rows.winners, draws.switch_timesteps, draws.switch_noise, rows.cond, dev)
            switch = (policy_mean, ref.switch.to(dev))
        loss, metrics = sspo_loss(policy_w, policy_l, ref.winners.to(dev), ref.losers.to(dev), self.cfg.beta, self.cfg.effective_ssr, switch)
        metrics["reference"] = torch.tensor(sum(draws.checkpoints) / len(draws.checkpoints), dtype=torch.float32)
        return loss, metrics

    def optimizer_step(self, batches: list[PairBatch]) -> dict[str, float]:
        totals: dict[str, float] = {}
        accum = len(batches)
        for batch in batches:
            # Divides the loss by accum; gradients are synchronised across processes (and DeepSpeed
            # steps) on the last micro-batch only.
            with self.accelerator.accumulate(self.unet):
                loss, metrics = self.loss(batch)
                self.accelerator.backward(loss)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value) / accum
        norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)  # DeepSpeed: clips in its step
        totals["grad_norm"] = float("nan") if norm is None else float(norm)
        # A non-finite loss on any process makes the averaged gradients, and so the norm every process sees, non-finite.
        # Under fp16 loss scaling an overflowing gradient is routine: the scaler skips that step and lowers its scale.
        scaler = self.accelerator.scaler
        if math.isfinite(totals["loss"]) and (norm is None or math.isfinite(totals["grad_norm"]) or scaler is not None):
            self.optimizer.step()
        elif self.cfg.nonfinite == "skip":
            self.nonfinite_skips += 1
        else:
            last = latest_checkpoint(self.run_dir)
            raise TrainingError(
                f"method {self.cfg.method}, step {self.global_step + 1}: non-finite loss {totals['loss']} or gradient norm {totals['grad_norm']}, "
                f"nothing saved from it; the last good state is {last or 'none (no state saved yet)'}: lower optim.learning_rate, "
                "or set nonfinite: skip to skip such steps, and run again with --resume"
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

    # ----------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> Path:
        cfg = self.cfg
        accum = cfg.optim.gradient_accumulation_steps
        total = cfg.iterations * cfg.steps_per_iteration
        # Closed on an error too, so that the error is printed on a line of its own.
        with tqdm(total=total, initial=self.global_step, desc=f"{cfg.method}", disable=not self.accelerator.is_local_main_process) as bar:
            while self.global_step < total:
                iteration, step_in_iteration = divmod(self.global_step, cfg.steps_per_iteration)
                first = iteration * self.micro_batches_per_iteration + step_in_iteration * accum
                last = (iteration + 1) * self.micro_batches_per_iteration
                pregenerated = self.iteration_pairs(list(range(first, last))) if cfg.pregenerate else None
                for m in range(first, last, accum):
                    batches = pregenerated[m - first : m - first + accum] if pregenerated else self.pair_builder.build(list(range(m, m + accum)))
                    batches = self.pair_builder.complete(batches)
                    if self.ssr_truth is not None:
                        with self._sampling():
                            self.ssr_truth.observe(batches, self.policy, iteration, self.global_step + 1)
                    metrics = self.optimizer_step(batches)
                    fault_point("step")
                    metrics.update(iteration=iteration, pool_size=len(self.pool) if self.pool is not None else 0)
                    self._log(metrics)
                    bar.update(1)
                    bar.set_postfix(_postfix(metrics))
                    if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0 and self.global_step % cfg.steps_per_iteration:
                        self.save_state()
                self.end_iteration(iteration)
        final = self.save_final()
        self.accelerator.end_training()
        return final

    def end_iteration(self, iteration: int) -> None:
        if self.cfg.generates_negatives:
            if self.accelerator.is_main_process:
                with disk_errors(f"pool checkpoint {len(self.pool)} in {self.pool.root}"):
                    self.pool.add(self.reference.policy_state(), step=self.global_step)  # theta_n
            self._sync_pool()
        self.save_state()
        every = self.cfg.validation.every_iterations
        if every and ((iteration + 1) % every == 0 or iteration + 1 == self.cfg.iterations):
            self.validate()

    # ----------------------------------------------------------------------------------------------
    # Logging, validation, state

    def _log(self, metrics: dict) -> None:
        self.accelerator.log({f"train/{k}": v for k, v in metrics.items()}, step=self.global_step)
        if self.accelerator.is_main_process and self.global_step % self.cfg.log_every == 0:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.global_step, **metrics}) + "\n")

    def validate(self) -> dict:
        """On the main process: a grid of the fixed prompts, and a world's exact scores if asked."""
        if not self.accelerator.is_main_process:
            return {}
        if self.cfg.validation.prompts:
            self.validation_grid()
        return self.world_eval() if self.cfg.validation.world_eval else {}

    @contextlib.contextmanager
    def _sampling(self):
        self.policy.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                yield
        finally:
            self.policy.train()

    def validation_grid(self) -> Path:
        """``validation.prompts`` sampled with the policy: a PNG in the run dir and a tensorboard image
        (for clips, their middle frames; the whole clips beside it as a GIF)."""
        from sspo.evaluation.sampling import clip_grid, generate, image_grid, save_animation, save_png

        vcfg, sampler = self.cfg.validation, self.cfg.negatives
        with self._sampling():
            images = generate(self.pipe, vcfg.prompts, [vcfg.seed] * len(vcfg.prompts), steps=sampler.steps, guidance_scale=sampler.guidance_scale,
                              size=self.cfg.data.resolution, frames=self.cfg.data.frames)
        fault_point("validation")
        name = self.run_dir / "validation" / f"step-{self.global_step:08d}"
        if is_video(self.pipe):
            frames = clip_grid([images], [f"step {self.global_step}"], vcfg.prompts)
            save_animation(frames, name.with_suffix(".gif"))
            grid = frames[len(frames) // 2]
        else:
            grid = image_grid([images], [f"step {self.global_step}"], vcfg.prompts)
        if self.cfg.report_to == "tensorboard":
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image("validation/grid", np.asarray(grid), self.global_step, dataformats="HWC")
        return save_png(grid, name.with_suffix(".png"))

    def world_eval(self) -> dict:
        """The exact rewards of the world the config names (``cfg.eval_world``) on its seen and
        held-out prompts, sampled as the negatives are."""
        from sspo.evaluation.evaluate import EvalConfig, evaluate_pipeline

        vcfg, data, sampler = self.cfg.validation, self.cfg.data, self.cfg.negatives
        eval_cfg = EvalConfig(prompts=self.cfg.eval_world, split_seed=data.world_split_seed, prompts_per_split=vcfg.prompts_per_split,
                              seeds=(vcfg.seed,), steps=sampler.steps, guidance_scale=sampler.guidance_scale, frames=data.frames or 8)
        with self._sampling():
            summary, _ = evaluate_pipeline(self.pipe, eval_cfg)
        fault_point("validation")
        metrics = {f"reward_{split}": scores[eval_cfg.metric_names[0]] for split, scores in summary.items()}
        self.accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=self.global_step)
        with open(self.run_dir / "validation.jsonl", "a") as f:
            f.write(json.dumps({"step": self.global_step, **metrics}) + "\n")
        return metrics

    def _start_fresh(self) -> None:
        """Set an earlier run in the output folder aside, deleted once this run saves its first state
        (sspo/training/run_folder.py); the pool restarts as {theta_0}."""
        self.accelerator.wait_for_everyone()  # every process has opened the earlier run's pool before it moves
        if self.accelerator.is_main_process:
            start_fresh(self.run_dir)
            if self.pool is not None:
                self.pool = CheckpointPool(self.pool.root)
                with disk_errors(f"pool checkpoint 0 in {self.pool.root}"):
                    self.pool.add(self.reference.policy_state(), step=0)  # theta_0
        self._sync_pool()

    def _sync_pool(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.pool is not None:
            self.pool = CheckpointPool(self.pool.root)
            self.reference.pool = self.pool
            self.reference.loaded = None

    def save_state(self) -> Path:
        """A resumable state (weights, optimizer, RNG, step, pool size, file manifests), written then renamed.

        The state file records the size and SHA-256 of the state's files and of the pool files it
        depends on, so a resume can tell an intact state from a truncated or corrupted one.
        """
        final = self.run_dir / "checkpoints" / f"step-{self.global_step:08d}"
        staging = final.with_name(final.name + ".partial")
        self.accelerator.wait_for_everyone()
        replicas = self._replica_fingerprints()
        with disk_errors(f"the resumable state {final}", staging):
            # accelerate creates the folder on the main process only, but every process writes its RNG
            # state into it: every process makes it, and all have written before the main one renames it.
            staging.mkdir(parents=True, exist_ok=True)
            self.accelerator.save_state(str(staging))
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                fault_point("checkpoint_save")
                state = {
                    "global_step": self.global_step, "pool_size": len(self.pool) if self.pool else 0, "replicas": replicas,
                    "nonfinite_skips": self.nonfinite_skips,
                    "files": manifest(staging, [p for p in staging.rglob("*") if p.is_file()]),
                    "pool_files": manifest(self.pool.root, [self.pool.root / e["file"] for e in self.pool.entries]) if self.pool else {},
                }
                atomic_write_json(staging / STATE_FILE, state)
                shutil.rmtree(final, ignore_errors=True)
                staging.rename(final)
        if self.accelerator.is_main_process:  # only now that the new state is complete may old ones go
            discard_previous(self.run_dir)
            for old in saved_states(self.run_dir)[: -self.cfg.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def _replica_fingerprints(self) -> list[list[float]] | None:
        """(sum, sum of squares) of the trainable weights, in float64, from every process.

        Under DDP each process holds a whole replica and applies the same all-reduced gradients,
        so the replicas stay bitwise equal; a difference means a process trained on something the
        others did not. FSDP and DeepSpeed shard the weights: nothing to compare there.
        """
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return None
        local = torch.zeros(2, dtype=torch.float64, device=self.device)
        for p in self.params:
            weights = p.detach().double()
            local += torch.stack([weights.sum(), weights.square().sum()])
        replicas = self.accelerator.gather(local[None]).tolist()
        if any(r != replicas[0] for r in replicas):
            log.error("the processes' model replicas differ at step %d: %s", self.global_step, replicas)
        return replicas

    def _resumable_state(self) -> Path | None:
        """The newest saved state whose files, and the pool files it depends on, are as they were saved."""
        damaged = []
        for state_dir in reversed(saved_states(self.run_dir)):
            try:
                state = read_state(state_dir / STATE_FILE)
            except DamagedFileError as exc:
                damaged.append(exc.problem)
                continue
            problems = manifest_problems(state_dir, state.get("files", {}))
            if self.pool is not None:
                problems += manifest_problems(self.pool.root, state.get("pool_files", {}))
            if not problems:
                if damaged:
                    log.warning("resuming from the older state %s: %s", state_dir, "; ".join(damaged))
                return state_dir
            damaged.append(f"{state_dir} cannot be resumed: {'; '.join(problems)}")
        if damaged:
            raise TrainingError(f"--resume: no intact saved state in {self.run_dir}: {'; '.join(damaged)}; restore the named files, or train without --resume to start again")
        log.warning("--resume: no saved state in %s; starting from scratch", self.run_dir)
        return None

    def _load_state(self, state_dir: Path) -> None:
        state = read_state(state_dir / STATE_FILE)
        self.accelerator.load_state(str(state_dir))
        self.global_step = state["global_step"]
        self.nonfinite_skips = state.get("nonfinite_skips", 0)
        if self.accelerator.is_main_process:  # forget what the killed run logged after its last save
            for staging in [*(self.run_dir / "checkpoints").glob("*.partial"), self.run_dir / "final.partial"]:
                shutil.rmtree(staging, ignore_errors=True)  # half-written saves of the killed run
            logs = {name: read_jsonl(self.run_dir / name, what="the training log", shape={"step": int}, fix="delete that line (or the log) and resume again")
                    for name in ("metrics.jsonl", "validation.jsonl", SSR_TRUTH_FILE)}  # every log read before any is rewritten
            for name, rows in logs.items():
                kept = [row for row in rows if row["step"] <= self.global_step]
                atomic_write_text(self.run_dir / name, "".join(json.dumps(row) + "\n" for row in kept))
        if self.pool is not None:
            if self.accelerator.is_main_process:
                self.pool.truncate(state["pool_size"])
            self._sync_pool()
        log.info("resumed from %s at step %d", state_dir, self.global_step)

    def save_final(self) -> Path:
        """The final model: LoRA weights that ``pipe.load_lora_weights`` reads, or a diffusers folder."""
        final = self.run_dir / "final"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            staging = final.with_name("final.partial")
            shutil.rmtree(staging, ignore_errors=True)
            with disk_errors(f"the final model {final}", staging):
                self._write_final(staging, final)
        self.accelerator.wait_for_everyone()
        return final

    def _write_final(self, staging: Path, final: Path) -> None:
        if self.cfg.model.lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft import get_peft_model_state_dict

            from sspo.io import sort_safetensors_metadata

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.policy, adapter_name=POLICY))
            # The adapter's config travels with the weights: without it load_lora_weights assumes
            # lora_alpha = rank, and a LoRA trained with alpha != rank reloads at the wrong scale.
            adapter = self.policy.peft_config[POLICY].to_dict()
            # A set lists in another order in another process (string hashing): sorted, the file is the same.
            if not isinstance(adapter["target_modules"], str):  # a pattern (motion modules only) stays as it is
                adapter["target_modules"] = sorted(adapter["target_modules"])
            self.pipe.__class__.save_lora_weights(
                save_directory=str(staging), unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=adapter,
            )
            # Its two metadata keys come out in a per-process order: sorted, a resumed run's file is the same bytes.
            sort_safetensors_metadata(staging / "pytorch_lora_weights.safetensors")
        else:
            components = {**self.pipe.components, "unet": self.policy}
            if is_video(self.pipe):  # motion_adapter/ as trained: MotionAdapter.from_pretrained reads it alone
                components["motion_adapter"] = motion_adapter_of(self.pipe.motion_adapter, self.policy)
            self.pipe.__class__(**components).save_pretrained(str(staging), safe_serialization=True)
        save_yaml(self.cfg, staging / "sspo_config.yaml")
        self._write_card(staging, final)
        fault_point("final_save")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)

    def _write_card(self, staging: Path, final: Path) -> None:
        from sspo.training.model_card import model_card

        grids = sorted((self.run_dir / "validation").glob("step-*.png"))
        if grids:
            shutil.copyfile(grids[-1], staging / "validation.png")
        card = model_card(
            self.cfg, base=self.base_model, pipeline_class=type(self.pipe).__name__, folder=str(final.resolve()),
            processes=self.accelerator.num_processes, grid="validation.png" if grids else None,
        )
        (staging / "README.md").write_text(card)


def lora_target_modules(targets, motion_only: bool) -> list[str] | str:
    """peft's ``target_modules``: the layer names, or a pattern matching them inside motion modules only."""
    if not motion_only:
        return list(targets)
    return rf".*motion_modules\..*\.({'|'.join(re.escape(t) for t in targets)})"


def _postfix(metrics: dict) -> dict:
    shown = {"loss": f"{metrics['loss']:.4f}"}
    if "ssr_rate" in metrics:
        shown["ssr"] = f"{metrics['ssr_rate']:.2f}"
        shown["ref"] = f"{metrics['reference']:.1f}/{metrics['pool_size'] - 1}"
    return shown


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train ``cfg`` in its output folder, checked and locked for the run (sspo/training/run_folder.py): a second run
    into a live run's folder is refused, and a run that fails before its first saved state leaves the folder as it was."""
    check_environment(cfg)
    # The main process holds the lock; the others write nothing the main process does not wait for.
    # It is the process of rank 0, which the launchers (torchrun, accelerate, deepspeed) set in RANK:
    # an accelerate state made before the Accelerator would miss the launch's CPU flag.
    main_process = int(os.environ.get("RANK", "0")) == 0
    with claimed(cfg.output_dir) if main_process else contextlib.nullcontext():
        return Trainer(cfg, resume=resume).train()


def dry_run(cfg: TrainConfig) -> str:
    """A summary of the run ``cfg`` describes, once its data and model config open (no weights load)."""
    from accelerate import PartialState

    from sspo.training.model_card import effective_batch, run_settings

    check_environment(cfg)
    check_output_dir(cfg.output_dir)
    dataset = open_dataset(cfg)
    name = cfg.model.pretrained
    if world := base_world(name):
        video = world.clips
        model = f"{name} (the {world.name} world's {world.base_pipeline}, shipped or built and cached on first use)"
    else:
        config = load_pipeline_config(name, cfg.model.revision)
        video = "motion_adapter" in config or cfg.model.motion_adapter is not None
        model = f"{name} ({config['_class_name']}{' + motion adapter ' + cfg.model.motion_adapter if cfg.model.motion_adapter else ''})"
    processes = PartialState().num_processes
    rows = {"model": model, **run_settings(cfg, processes, video)}
    epochs = cfg.iterations * cfg.steps_per_iteration * effective_batch(cfg, processes) / len(dataset)
    rows["data"] += f"; {len(dataset)} rows of {'pairs' if dataset.has_losers else 'single images'}, {epochs:.2f} epochs"
    rows["output"] = cfg.output_dir
    return "dry run: config, data and model OK\n" + "\n".join(f"  {key:<12} {value}" for key, value in rows.items())
