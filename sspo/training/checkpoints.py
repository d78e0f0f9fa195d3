"""A run's saved states and its final model: written whole (staged, then renamed), resumed only when intact.

:class:`Checkpointing` is the trainer's half that writes and reads the run folder (``checkpoints/``,
``pool/``, ``final/`` and the logs a resume rewinds); sspo/training/trainer.py is the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import uuid
from pathlib import Path

import torch

from sspo.config import load_yaml, save_yaml
from sspo.errors import ConfigError, TrainingError
from sspo.io import DamagedFileError, atomic_write_json, atomic_write_text, os_error_of, read_json, read_jsonl, remove_temporaries
from sspo.models.families.base import adapter_config
from sspo.training.faults import fault_point
from sspo.training.pool import CheckpointPool
from sspo.training.reference import POLICY
from sspo.training.run_folder import MANIFEST, discard_previous, start_fresh
from sspo.training.run_lock import HOLDER_FILE, LOCK_FILE
from sspo.training.run_state import HARMLESS_KEYS, STATE_FILE, config_differences, disk_to_come, manifest, manifest_problems, read_state, saved_states, saves_after
from sspo.training.ssr_truth import FILE as SSR_TRUTH_FILE

# Learning-rate schedules that do not depend on the run's length: a resume may change `iterations` under them.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")
LOGS = ("metrics.jsonl", "validation.jsonl", SSR_TRUTH_FILE)  # the run's JSON-lines logs, each row with its step
# In a resumable state with optim.ema: the averaged weights by parameter name, and EMAModel's other state (its step, decay ...).
EMA_WEIGHTS, EMA_STATE = "ema.safetensors", "ema.json"

log = logging.getLogger(__name__)


def validation_grid_stem(run_dir: Path, step: int) -> Path:
    """The validation grid of ``step`` without its suffix (a PNG; for clips a GIF beside it)."""
    return run_dir / "validation" / f"step-{step:08d}"


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def latest_state(run_dir: Path) -> Path | None:
    """The newest saved state of ``run_dir`` (None: none saved yet)."""
    states = saved_states(run_dir)
    return states[-1] if states else None


def resume_point(run_dir: Path, pool_root: Path | None) -> Path | None:
    """The state ``--resume`` continues: the newest whose files, and the pool files (in ``pool_root``)
    it depends on, are as they were saved, with a warning naming what is wrong with any newer one;
    None where nothing is saved. No intact state among saved ones is an error."""
    damaged = []
    for state_dir in reversed(saved_states(run_dir)):
        try:
            state = read_state(state_dir / STATE_FILE)
        except DamagedFileError as exc:
            damaged.append(exc.problem)
            continue
        problems = manifest_problems(state_dir, state.get("files", {}))
        if pool_root is not None:
            problems += manifest_problems(pool_root, state.get("pool_files", {}))
        if not problems:
            if damaged:
                log.warning("resuming from the older state %s: %s", state_dir, "; ".join(damaged))
            return state_dir
        damaged.append(f"{state_dir} cannot be resumed: {'; '.join(problems)}")
    if damaged:
        raise TrainingError(f"--resume: no intact saved state in {run_dir}: {'; '.join(damaged)}; restore the named files, or train without --resume to start again")
    # sspo's own marks (the run's lock and manifest) are all a new folder holds by now: nothing there to lose.
    wrote = run_dir.is_dir() and any(entry.name not in (MANIFEST, LOCK_FILE, HOLDER_FILE) for entry in run_dir.iterdir())
    log.warning("--resume: no saved state in %s; starting from scratch%s", run_dir, " (what a run there wrote is deleted at this run's first save)" if wrote else "")
    return None


@contextlib.contextmanager
def disk_errors(what: str, staging: Path | None = None):
    """A failed write (a full disk, a read-only folder) as one clear error, its half-written ``staging``
    removed, as it is when Ctrl-C or SIGTERM stops the write."""
    try:
        yield
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if (failed := os_error_of(exc)) is None:
            raise
        raise TrainingError(
            f"could not write {what}: {failed.strerror or failed} ({failed.filename or staging}); earlier saved states are intact: "
            "free disk space or fix the folder's permissions, then run again with --resume"
        ) from None


def check_resumed_config(cfg, run_dir: Path, processes: int) -> None:
    """A resumed run must compute what the saved one did: result-changing keys may not differ, nor
    the number of processes (the effective batch, so every step and the schedule's length, depend
    on it), and it may not end before the step it has reached. A finished run without a saved state
    is not resumed from scratch: that start would delete it."""
    saved, latest = run_dir / "config.yaml", latest_state(run_dir)
    if latest is None and (run_dir / "final").is_dir():
        raise TrainingError(f"--resume: {run_dir} holds a finished run (final/) but no saved state to continue from (checkpoints/ is empty); "
                            "train without --resume to replace it, or into a new output_dir")
    if latest is None or not saved.is_file():
        return  # nothing to resume: the run starts from scratch
    saved_config = load_yaml(saved)
    compared = [dict(saved_config), dataclasses.asdict(cfg), dataclasses.asdict(type(cfg)())]
    for key in cfg.unused_keys:  # what the method's training never reads cannot change its weights
        for config in compared:
            config.pop(key, None)
    differences = config_differences(*compared)
    if differences:
        raise ConfigError(
            f"--resume: the config differs from the one {run_dir} was trained with ({'; '.join(differences)}); "
            f"set those keys back, or train into a new output_dir (only {', '.join(HARMLESS_KEYS)} may change)"
        )
    trained_for = saved_config.get("iterations", cfg.iterations)
    if trained_for != cfg.iterations and cfg.optim.lr_scheduler not in LENGTH_FREE_SCHEDULES:
        raise ConfigError(f"--resume: iterations {trained_for} -> {cfg.iterations}: optim.lr_scheduler {cfg.optim.lr_scheduler} decays over the run's "
                          "length, so the resumed steps would follow neither length's schedule; set iterations back, or train into a new output_dir "
                          f"(a run with lr_scheduler {' or '.join(LENGTH_FREE_SCHEDULES)} may be extended)")
    try:
        state = read_state(latest / STATE_FILE)
    except DamagedFileError:  # the resume falls back to an older intact state
        return
    trained_by = state.get("processes") or len(state.get("replicas") or []) or processes  # one replica fingerprint per process
    if trained_by != processes:
        raise ConfigError(f"--resume: {run_dir} was trained by {trained_by} process{'es' if trained_by > 1 else ''}, this launch runs {processes}; "
                          f"resume it with {trained_by} (accelerate launch --num_processes {trained_by}), or train into a new output_dir")
    steps = cfg.iterations * cfg.steps_per_iteration
    if state["global_step"] > steps:
        raise ConfigError(f"--resume: {run_dir} has trained {state['global_step']} optimizer steps, past iterations={cfg.iterations} x "
                          f"{cfg.steps_per_iteration} = {steps}; set iterations={-(-state['global_step'] // cfg.steps_per_iteration)} or more, "
                          "or train into a new output_dir")


class Checkpointing:
    """Saving and resuming, mixed into :class:`sspo.training.trainer.Trainer`, whose state it reads
    and writes: ``cfg``, ``run_dir``, ``accelerator``, ``device``, ``family``, ``pipe``, ``base_model``,
    ``policy``, ``params``, ``param_names``, ``ema``, ``averaged_weights``, ``pool``, ``reference``, ``global_step``,
    ``nonfinite_skips`` and ``example_prompt``; it sets ``tracker_run_id`` and ``disk_checked``."""

    def start_or_resume(self, resume: bool) -> None:
        """Continue from the newest intact saved state (``resume``), or start afresh; nothing in the
        output folder is moved or rewritten before this."""
        # The run's id at wandb: a resumed run goes on logging into the run it continues, a fresh start into a new one.
        self.tracker_run_id = uuid.uuid4().hex[:16]
        self.disk_checked = False  # the free space is checked against what the run will write at its first save
        state_dir = resume_point(self.run_dir, self.pool.root if self.pool is not None else None) if resume else None
        if state_dir is not None:
            self._load_state(state_dir)
        else:
            self._start_fresh(could_resume=not resume)
        if self.pool is not None and self.cfg.model.lora and self.accelerator.is_main_process:
            with disk_errors(f"the adapter config of the checkpoint pool {self.pool.root}"):
                self.pool.save_adapter_config(adapter_config(self.policy, POLICY))

    def _start_fresh(self, could_resume: bool) -> None:
        """Set an earlier run in the output folder aside, deleted once this run saves its first state
        (sspo/training/run_folder.py); the pool restarts as {theta_0}."""
        self.accelerator.wait_for_everyone()  # every process has opened the earlier run's pool before it moves
        if self.accelerator.is_main_process:
            resumable = could_resume and bool(saved_states(self.run_dir))
            if start_fresh(self.run_dir) and could_resume:  # under --resume the line above said it starts over
                log.warning("%s holds an earlier run: this one replaces it (the earlier one is deleted at this run's first save%s)",
                            self.run_dir, "; to continue it instead, stop now and pass --resume" if resumable else "")
            if self.pool is not None:
                self.pool = CheckpointPool(self.pool.root, self.pool.denoiser)
                with disk_errors(f"pool checkpoint 0 in {self.pool.root}"):
                    self.pool.add(self.reference.policy_state(), step=0)  # theta_0
        self._sync_pool()

    def _sync_pool(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.pool is not None:
            self.pool = CheckpointPool(self.pool.root, self.pool.denoiser)
            self._check_pool_shared()
            self.reference.pool = self.pool
            self.reference.loaded = None

    def _check_pool_shared(self) -> None:
        """Every process must read the pool the main process wrote: an output_dir on each machine's own
        disk would give the others another run's pool (its negatives and references) or none."""
        from accelerate.utils import broadcast_object_list

        if self.accelerator.num_processes == 1:
            return
        written = broadcast_object_list([self.pool.entries])[0]
        same = self.accelerator.gather(torch.tensor([float(self.pool.entries == written)], device=self.device))
        if not same.all():
            others = ", ".join(str(rank) for rank in (same == 0).nonzero().flatten().tolist())
            raise TrainingError(f"output_dir {self.run_dir}: process {others} reads another checkpoint pool than the main process wrote; "
                                "every process must see the same output_dir: put it on a filesystem all machines share")

    def save_state(self) -> Path:
        """A resumable state (weights, optimizer, RNG, step, pool size, file manifests), written then renamed.

        The state file records the size and SHA-256 of the state's files and of the pool files it
        depends on, so a resume can tell an intact state from a truncated or corrupted one.
        """
        final = self.run_dir / "checkpoints" / f"step-{self.global_step:08d}"
        staging = final.with_name(final.name + ".partial")
        self.accelerator.wait_for_everyone()
        replicas = self._replica_fingerprints()
        with disk_errors(f"the resumable state {final}", staging if self.accelerator.is_main_process else None):  # the others may stop first
            # accelerate creates the folder on the main process only, but every process writes its RNG
            # state into it: every process makes it, and all have written before the main one renames it.
            staging.mkdir(parents=True, exist_ok=True)
            self.accelerator.save_state(str(staging))
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                fault_point("checkpoint_save")
                if self.ema is not None:
                    self._save_ema(staging)
                state = {
                    "global_step": self.global_step, "pool_size": len(self.pool) if self.pool else 0, "replicas": replicas,
                    "processes": self.accelerator.num_processes,
                    "nonfinite_skips": self.nonfinite_skips, "data_rows": len(self.dataset), "data_files": self.data_digest,
                    "example_prompt": self.example_prompt,
                    "tracker_run_id": self.tracker_run_id,
                    "files": manifest(staging, [p for p in staging.rglob("*") if p.is_file()]),
                    # Only the checkpoints its erd can still draw: the others may be released (_release_pool_files).
                    "pool_files": manifest(self.pool.root, [self.pool.root / self.pool.entries[i]["file"]
                                                            for i in self.pool.drawable(self.cfg.effective_erd)]) if self.pool else {},
                    # A resume can then tell a row cut short by a kill after this save from one lost to damage.
                    "log_rows": {name: len(self._read_log(name)) for name in LOGS if (self.run_dir / name).exists()},
                }
                atomic_write_json(staging / STATE_FILE, state)
                shutil.rmtree(final, ignore_errors=True)
                staging.rename(final)
        if self.accelerator.is_main_process:  # only now that the new state is complete may old ones go
            discard_previous(self.run_dir)
            for old in saved_states(self.run_dir)[: -self.cfg.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
            self._release_pool_files()
            if not self.disk_checked:
                self.disk_checked = True
                self._warn_if_the_disk_is_short(final)
        self.accelerator.wait_for_everyone()
        return final

    def _release_pool_files(self) -> None:
        """Release the pool checkpoints no saved state names: under ``erd: initial`` or ``last`` those
        never drawn again, whole denoisers when fully fine-tuned (a state names what it can draw)."""
        if self.pool is None:
            return
        keep = set()
        for state_dir in saved_states(self.run_dir):
            try:
                keep |= set(read_state(state_dir / STATE_FILE)["pool_files"])
            except DamagedFileError:
                return  # a state whose needs are unknown could need any of them
        with disk_errors(f"the checkpoint pool {self.pool.root}"):
            self.pool.release(keep)

    def _warn_if_the_disk_is_short(self, state_dir: Path) -> None:
        """One warning, at the first save, when what the run will still write (measured on this state
        and the newest pool checkpoint) exceeds the free space: hours before a save would fail."""
        cfg = self.cfg
        total = cfg.iterations * cfg.steps_per_iteration
        saves_left, ends_left = saves_after(self.global_step, total, cfg.steps_per_iteration, cfg.save_every_steps)
        state_bytes = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file())
        pool_bytes = (self.pool.root / self.pool.entries[self.pool.kept()[-1]]["file"]).stat().st_size if self.pool is not None and cfg.generates_negatives else 0
        # Under erd initial or last the pool holds at most the checkpoints the kept states can draw, and the one just added.
        pool_adds = ends_left if cfg.effective_erd == "uniform" else min(ends_left, cfg.checkpoints_total_limit)
        kept = len(saved_states(self.run_dir))
        final_bytes = sum(p.numel() * p.element_size() for p in self.params)  # at least its trained weights
        needed = disk_to_come(state_bytes, pool_bytes, kept, cfg.checkpoints_total_limit, saves_left, pool_adds) + final_bytes
        free = shutil.disk_usage(self.run_dir).free
        if needed > free:
            pool = f"{pool_adds} more pool checkpoint{'s' if pool_adds != 1 else ''} of {_gb(pool_bytes)}, " if pool_bytes and pool_adds else ""
            log.warning("%s has %s free, but this run will write about %s more (%sresumable states of %s each: up to "
                        "checkpoints_total_limit=%d kept and one more while it saves, and the final model): free some space, lower "
                        "checkpoints_total_limit, or stop and resume on a larger disk", self.run_dir, _gb(free), _gb(needed), pool,
                        _gb(state_bytes), cfg.checkpoints_total_limit)

    def _save_ema(self, folder: Path) -> None:
        from safetensors.torch import save_file

        state = self.ema.state_dict()
        save_file(dict(zip(self.param_names, state.pop("shadow_params"))), folder / EMA_WEIGHTS)
        atomic_write_json(folder / EMA_STATE, state)

    def _load_ema(self, folder: Path) -> None:
        from safetensors.torch import load_file

        fix = "restore it, or train without --resume to start again"
        state = read_json(folder / EMA_STATE, what="the moving average's state", shape={"optimization_step": int}, fix=fix)
        weights = load_file(folder / EMA_WEIGHTS, device=str(self.device))
        missing = [name for name in self.param_names if name not in weights]
        if missing:
            raise DamagedFileError(f"the moving average {folder / EMA_WEIGHTS} lacks trained weights, e.g. {missing[0]}", fix)
        self.ema.load_state_dict({**state, "shadow_params": [weights[name] for name in self.param_names]})

    def _replica_fingerprints(self) -> list[list[float]]:
        """(sum, sum of squares) of the trainable weights, in float64, from every process.

        Each process holds a whole replica (launches that shard the weights, FSDP and ZeRO-3, are
        refused) and applies the same all-reduced gradients (ZeRO-2: the same gathered update), so
        the replicas stay bitwise equal; a difference means a process trained on something the
        others did not.
        """
        local = torch.zeros(2, dtype=torch.float64, device=self.device)
        for p in self.params:
            weights = p.detach().double()
            local += torch.stack([weights.sum(), weights.square().sum()])
        replicas = self.accelerator.gather(local[None]).tolist()
        if any(r != replicas[0] for r in replicas):
            log.warning("the processes' model replicas differ at step %d: %s", self.global_step, replicas)
        return replicas

    def _load_state(self, state_dir: Path) -> None:
        state = read_state(state_dir / STATE_FILE)
        self.accelerator.load_state(str(state_dir))
        if self.ema is not None:
            self._load_ema(state_dir)
        self.global_step = state["global_step"]
        self.nonfinite_skips = state.get("nonfinite_skips", 0)
        if isinstance(state.get("tracker_run_id"), str):
            self.tracker_run_id = state["tracker_run_id"]
        prompt = state.get("example_prompt")  # the model card's: a finished run resumed writes the same card
        self.example_prompt = prompt if isinstance(prompt, str) else None
        if state.get("data_rows", len(self.dataset)) != len(self.dataset) and self.accelerator.is_main_process:  # rows added or removed since the save
            log.warning("the data (%s) holds %d rows, %d when %s was saved: the run goes on, but on other batches than it would have",
                        self.cfg.data.path or self.cfg.data.source, len(self.dataset), state["data_rows"], state_dir.name)
        elif state.get("data_files", self.data_digest) != self.data_digest and self.accelerator.is_main_process:
            log.warning("the files of the data (%s) changed since %s was saved (a name, size or modification time): the run goes on "
                        "with the data as it is now, which the steps before the save did not see", self.cfg.data.path, state_dir.name)
        if self.accelerator.is_main_process:  # forget what the killed run logged after its last save
            logs = {name: self._read_log(name) for name in LOGS if (self.run_dir / name).exists()}  # all read before any is rewritten
            self._check_logs_cover(state_dir, state, logs)
            for staging in [*(self.run_dir / "checkpoints").glob("*.partial"), self.run_dir / "final.partial"]:
                shutil.rmtree(staging, ignore_errors=True)  # half-written saves of the killed run
            remove_temporaries(self.run_dir)  # and its writes' temporary files (the run's lock is held)
            for name, rows in logs.items():  # _read_log kept the rows up to the resumed step
                atomic_write_text(self.run_dir / name, "".join(json.dumps(row) + "\n" for row in rows))
        if self.pool is not None:
            if self.accelerator.is_main_process:
                self.pool.truncate(state["pool_size"])
                self._release_pool_files()  # a kill may have come between a save and its release
            self._sync_pool()
        if self.accelerator.is_main_process:
            log.info("resumed from %s at step %d", state_dir, self.global_step)

    def _read_log(self, name: str) -> list[dict]:
        """A log's whole rows up to the current step (a last line cut short by a kill is left out)."""
        rows = read_jsonl(self.run_dir / name, what="the training log", shape={"step": int}, fix="delete that line (or the log) and resume again")
        return [row for row in rows if row["step"] <= self.global_step]

    def validated(self) -> bool:
        """Whether the validation at the current step left what it writes last: its scores' row in
        ``validation.jsonl``, or without scores its grid (other processes: True, they validate nothing)."""
        vcfg = self.cfg.validation
        if not self.accelerator.is_main_process:
            return True
        if vcfg.metrics or vcfg.world_eval:
            log_file = self.run_dir / "validation.jsonl"
            return log_file.exists() and any(row["step"] == self.global_step for row in self._read_log(log_file.name))
        return not vcfg.prompts or validation_grid_stem(self.run_dir, self.global_step).with_suffix(".png").exists()

    def _check_logs_cover(self, state_dir: Path, state: dict, logs: dict[str, list[dict]]) -> None:
        """Refuse to resume from a log that lost rows the state was saved after: a resume re-logs only
        the steps after it, so dropping a cut-short row there would leave the log neither whole nor as it was."""
        saved = state.get("log_rows", {})  # a state without row counts has none to check
        if not isinstance(saved, dict) or not all(isinstance(n, int) for n in saved.values()):
            raise DamagedFileError(f"the resumable state {state_dir / STATE_FILE} is damaged (log_rows is not a table of row counts)",
                                   "restore it, or train without --resume to start again")
        for name, rows in logs.items():
            if len(rows) < saved.get(name, 0):
                raise DamagedFileError(f"the training log {self.run_dir / name} holds {len(rows)} of the {saved[name]} rows up to step "
                                       f"{self.global_step} that {state_dir.name} was saved after (cut short or edited)",
                                       "restore the file, or delete it to resume without its earlier rows")

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
            self.family.save_lora(self.policy, POLICY, staging)
        else:
            with self.averaged_weights():  # optim.ema: the final model is the moving average, as diffusers' train_text_to_image saves it
                self.family.save_full(self.policy, staging)
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
            self.cfg, base=self.base_model, video=self.family.video, folder=str(final.resolve()),
            processes=self.accelerator.num_processes, grid="validation.png" if grids else None, prompt=self.example_prompt,
            absent=tuple(name for name, component in self.pipe.components.items() if component is None and name not in self.pipe._optional_components),
            family=type(self.family),
        )
        (staging / "README.md").write_text(card)
