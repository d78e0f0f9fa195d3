import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sspo.config import apply_overrides, from_dict, load_config
from sspo.errors import ConfigError, DataError, ModelError, SSPOError
from sspo.training.config import TrainConfig
from sspo.training.trainer import Trainer, dry_run, train

from lora_checks import assert_lora_reloads_as_trained
from scorer_models import clip_model_dir, clip_processor_dir  # noqa: F401  (fixtures)

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo-shapes.yaml"


def tiny_overrides(out: Path, model: str) -> list[str]:
    """The demo config shrunk to seconds: 2 iterations of 2 steps, batch 4, 2 sampler steps."""
    return [
        f"model.pretrained={model}", f"output_dir={out}", "report_to=none", "iterations=2", "steps_per_iteration=2",
        "optim.batch_size=4", "negatives.steps=2", "negatives.batch_size=8", "data.world_pairs_per_prompt=1",
        "data.max_samples=64", "validation.every_iterations=0",
    ]


def tiny_config(out: Path, model: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, DEMO, tiny_overrides(out, model) + list(overrides))


def pairs_settings(out: Path, model: str, data: Path) -> dict:
    """2 iterations x 1 step of batch 2 on the pairs file ``data``, 32 px, 2 sampler steps, the
    family's own sampler and guidance, as a config file holds them."""
    return {
        "model": {"pretrained": model},
        "data": {"source": "parquet", "path": str(data), "resolution": 32},
        "optim": {"batch_size": 2, "learning_rate": 1e-2},
        "negatives": {"steps": 2},
        "iterations": 2,
        "steps_per_iteration": 1,
        "output_dir": str(out),
        "report_to": "none",
    }


def pairs_config(out: Path, model: str, data: Path, *overrides: str) -> TrainConfig:
    """:func:`pairs_settings` with ``overrides``: a model family's tests."""
    return from_dict(TrainConfig, apply_overrides(pairs_settings(out, model, data), list(overrides)))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


ARMS = {
    "sft": ["method=sft"],
    "dpo": ["method=dpo"],
    "spin": ["method=spin"],
    "sspo": ["method=sspo"],
    "sspo_indicator": ["ssr=indicator"],
    "sspo_ssr_off": ["ssr=off"],
    "sspo_erd_initial": ["erd=initial"],
    "sspo_erd_last": ["erd=last"],
    "sspo_erd_per_sample": ["erd_per=sample"],
    "sspo_r": ["data.mode=random"],
    "sspo_full_finetune": ["model.lora=false"],
    "sspo_online": ["pregenerate=false"],
    "sspo_uncached_reference": ["cache_reference_errors=false", "optim.gradient_accumulation_steps=2"],
    "sspo_ssr_draws": ["ssr_draws=3"],
    "sspo_ssr_draws_online": ["ssr_draws=3", "pregenerate=false"],
}


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_method_and_variant_trains(arm, quick_base, tmp_path):
    cfg = tiny_config(tmp_path / arm, quick_base, *ARMS[arm])
    final = train(cfg)
    rows = metrics(tmp_path / arm)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if cfg.method == "sft":
        assert "ssr_rate" not in rows[0]
    else:
        assert {"implicit_acc", "ssr_rate", "dw", "dl", "reference_checkpoint"} <= set(rows[0])
        if cfg.effective_ssr == "off":
            assert all(r["ssr_rate"] == 0 for r in rows)
    pool = json.loads((tmp_path / arm / "pool" / "pool.json").read_text())["entries"] if cfg.uses_reference else []
    if cfg.generates_negatives:
        assert [e["step"] for e in pool] == [0, 2, 4]  # theta_0 plus one checkpoint per iteration
        if cfg.effective_erd == "last":
            assert [r["reference_checkpoint"] for r in rows] == [0, 0, 1, 1]
        if cfg.effective_erd == "initial":
            assert all(r["reference_checkpoint"] == 0 for r in rows)
        # Each of the 2 kept states names the checkpoints it can draw; the pool releases the others.
        kept = {"uniform": [0, 1, 2], "initial": [0], "last": [1, 2]}[cfg.effective_erd]
        assert [i for i, e in enumerate(pool) if not e.get("released")] == kept
        assert [bool(load_file(tmp_path / arm / "pool" / e["file"])) for e in pool] == [i in kept for i in range(3)]
    weights = final / ("pytorch_lora_weights.safetensors" if cfg.model.lora else "unet/diffusion_pytorch_model.safetensors")
    assert weights.is_file()


def test_online_and_pregenerated_give_the_same_training(quick_base, tmp_path):
    # Generation batches of one micro-batch each make the two modes' arithmetic identical too: at
    # theta_0 the policy and reference errors tie exactly, and K = sign(dw) is decided by rounding.
    runs = {}
    for pregenerate in (True, False):
        cfg = tiny_config(tmp_path / str(pregenerate), quick_base, f"pregenerate={str(pregenerate).lower()}", "iterations=3", "negatives.batch_size=4")
        final = train(cfg)
        runs[pregenerate] = (metrics(tmp_path / str(pregenerate)), load_file(final / "pytorch_lora_weights.safetensors"))
    (rows_pre, weights_pre), (rows_online, weights_online) = runs[True], runs[False]
    for a, b in zip(rows_pre, rows_online):
        assert a["reference_checkpoint"] == b["reference_checkpoint"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["ssr_rate"] == b["ssr_rate"]
    for key in weights_pre:
        torch.testing.assert_close(weights_pre[key], weights_online[key], rtol=1e-4, atol=1e-5)


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("lora", [True, False])
def test_killed_run_resumes_to_the_same_pool_and_weights(quick_base, tmp_path, monkeypatch, lora):
    extra = ["iterations=3", f"model.lora={str(lora).lower()}"]
    whole = train(tiny_config(tmp_path / "whole", quick_base, *extra))

    cfg = tiny_config(tmp_path / "killed", quick_base, *extra)
    real_step = Trainer.optimizer_step

    def crash_mid_iteration(self, batches):
        if self.global_step == 3:  # the middle of the second iteration
            raise Crash
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "optimizer_step", crash_mid_iteration)
    with pytest.raises(Crash):
        train(cfg)
    monkeypatch.setattr(Trainer, "optimizer_step", real_step)
    resumed = train(cfg, resume=True)

    pools = [json.loads((tmp_path / name / "pool" / "pool.json").read_text())["entries"] for name in ("whole", "killed")]
    assert pools[0] == pools[1]
    for entry in pools[0]:
        a = load_file(tmp_path / "whole" / "pool" / entry["file"])
        b = load_file(tmp_path / "killed" / "pool" / entry["file"])
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    name = "pytorch_lora_weights.safetensors" if lora else "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(whole / name), load_file(resumed / name)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in metrics(tmp_path / "killed")] == list(range(1, 7))  # no step logged twice


def test_lora_output_loads_in_stock_diffusers(quick_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    final = train(tiny_config(tmp_path / "run", quick_base, "optim.learning_rate=0.01"))
    pipe = StableDiffusionPipeline.from_pretrained(quick_base)
    before = pipe("a small red circle on the left, white background", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    pipe.load_lora_weights(str(final))
    after = pipe("a small red circle on the left, white background", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert not torch.allclose(before, after)


def test_lora_with_alpha_not_rank_reloads_at_its_trained_scale(quick_base, tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", quick_base, "optim.learning_rate=0.01", "model.lora_rank=4", "model.lora_alpha=16"))
    final = trainer.train()
    assert_lora_reloads_as_trained(trainer, quick_base, final, "a small red circle on the left, white background")


def test_full_finetune_output_is_a_diffusers_folder(quick_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    final = train(tiny_config(tmp_path / "run", quick_base, "model.lora=false", "method=sft"))
    pipe = StableDiffusionPipeline.from_pretrained(str(final))
    base = StableDiffusionPipeline.from_pretrained(quick_base)
    changed = [not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters())]
    assert any(changed)


def test_dpo_without_pairs_is_a_clear_error(quick_base, tmp_path):
    from sspo.worlds.shapes.world import make_split, write_imagefolder

    folder = write_imagefolder(tmp_path / "images", make_split().train[:4])
    cfg = tiny_config(tmp_path / "run", quick_base, "method=dpo", "data.source=imagefolder", f"data.path={folder}")
    with pytest.raises(DataError, match="needs \\(winner, loser\\) pairs"):
        Trainer(cfg)


def test_missing_model_path_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path / "run", str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="no-such-model"):
        Trainer(cfg)


def test_random_flips_change_from_epoch_to_epoch(quick_base, tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", quick_base, "method=sft", "data.random_flip=true", "data.max_samples=4"))
    rows = [row for m in range(8) for row, _ in trainer._placements(m)]
    assert sorted(rows[:4]) == [0, 1, 2, 3]  # one epoch is a permutation of the rows
    views = {(row, epoch): trainer.dataset.item(row, epoch)["winner"] for row in range(4) for epoch in range(8)}
    # Some rows are mirror-symmetric (a circle in the center); the others must flip in some epoch.
    assert any(not torch.equal(views[row, 0], views[row, e]) for row in range(4) for e in range(1, 8))
    assert torch.equal(views[2, 3], trainer.dataset.item(2, 3)["winner"])  # and reproducible


def test_a_finished_trainer_is_freed(quick_base, tmp_path):
    """Nothing outside a trainer keeps it (and its models) alive: compare and bench run many in one process."""
    import gc
    import weakref

    trainer = Trainer(tiny_config(tmp_path, quick_base, "method=sft", "iterations=1", "steps_per_iteration=1"))
    trainer.train()
    ref = weakref.ref(trainer)
    del trainer
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("schedule, expected", [
    ("constant_with_warmup", [1.0, 1.0, 1.0, 1.0]),  # the default: no warm-up steps, the rate as set
    ("linear", [0.75, 0.5, 0.25, 0.0]),  # reaches 0 at the run's last optimizer step (2 x 2)
])
def test_the_learning_rate_follows_the_named_schedule_over_the_whole_run(schedule, expected, quick_base, tmp_path):
    train(tiny_config(tmp_path / "run", quick_base, "method=sft", "log_every=1", "optim.learning_rate=1e-3", f"optim.lr_scheduler={schedule}"))
    # Each logged rate is the one the next step will use.
    assert [round(row["lr"] / 1e-3, 6) for row in metrics(tmp_path / "run")] == expected


def test_a_parquet_of_many_row_groups_trains_holding_two_of_them(quick_base, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sspo.worlds.shapes.world import make_split, preference_pairs

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(preference_pairs(make_split().train[:12], per_spec=1, seed=0)), path, row_group_size=3)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read the whole table"))
    trainer = Trainer(tiny_config(tmp_path / "run", quick_base, "method=dpo", "data.source=parquet", f"data.path={path}", "data.shuffle_row_groups=2"))
    groups = trainer.dataset._rows
    read = []
    monkeypatch.setattr(groups, "_group", lambda g, read_group=groups._group: read.append(g) or read_group(g))
    assert (trainer.train() / "pytorch_lora_weights.safetensors").is_file()
    assert len(groups._cache) <= 2 and len(set(read)) == pq.read_metadata(path).num_row_groups == 4  # 16 items of 12 rows: every group read


def test_a_batch_larger_than_twice_the_data_trains(quick_base, tmp_path):
    """A micro-batch of 8 from 3 rows spans three epochs, and is placed more than once."""
    from sspo.io import write_parquet
    from sspo.worlds.shapes.world import make_split, preference_pairs

    path = write_parquet(tmp_path / "pairs.parquet", preference_pairs(make_split().train[:3], per_spec=1, seed=0))
    cfg = tiny_config(tmp_path / "run", quick_base, "data.source=parquet", f"data.path={path}", "optim.batch_size=8", "iterations=1")
    assert (train(cfg) / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("broken, steps", [((2, 5), 2), ((1, 2, 3, 4, 5, 6), 1)], ids=["every-row-once", "some-met-only-as-replacements"])
def test_unreadable_rows_are_totalled_at_the_end_whichever_process_read_them(broken, steps, workers, quick_base, tmp_path, caplog):
    import logging

    from sspo.io import write_parquet
    from sspo.worlds.shapes.world import make_split, preference_pairs

    rows = preference_pairs(make_split().train[:8], per_spec=1, seed=0)
    for row in broken:
        rows[row] = {**rows[row], "jpg_0": b"not an image"}
    path = write_parquet(tmp_path / "pairs.parquet", rows)
    cfg = tiny_config(tmp_path / "run", quick_base, "method=sft", "data.source=parquet", f"data.path={path}", f"data.num_workers={workers}",
                      "iterations=1", f"steps_per_iteration={steps}")  # 2 steps: 8 items, every row once
    with caplog.at_level(logging.WARNING):
        train(cfg)
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable row")]
    totals = [r.getMessage() for r in caplog.records if r.name == "sspo.training.trainer" and "unreadable" in r.getMessage()]
    assert totals == [f"{len(named)} unreadable rows were skipped in this run (since it started or resumed), each replaced by the next readable row; "
                      "the warnings above name them"]
    # Every row asked for once: every broken one named; half of them asked for: some met only as others' replacements.
    assert len(named) == len(broken) if steps == 2 else 0 < len(named) < len(broken)


@pytest.mark.parametrize("decay", [0.9999, 0.0])
def test_the_final_full_finetune_is_the_moving_average_and_decay_0_the_raw_weights(decay, quick_base, tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", quick_base, "model.lora=false", "optim.ema=true", f"optim.ema_decay={decay}"))
    final = load_file(trainer.train() / "unet" / "diffusion_pytorch_model.safetensors")
    raw = dict(zip(trainer.param_names, trainer.params))
    average = dict(zip(trainer.param_names, trainer.ema.shadow_params))
    assert all(torch.equal(final[name], average[name]) for name in raw)
    if decay:
        assert not all(torch.equal(final[name], raw[name]) for name in raw)
    else:  # EMAModel steps the average by s - (s - p), which rounds
        for name in raw:
            torch.testing.assert_close(final[name], raw[name].detach(), rtol=0, atol=1e-6)
    pool = load_file(tmp_path / "run" / "pool" / "checkpoint-002.safetensors")  # theta_2 is the raw policy
    assert all(torch.equal(pool[name], raw[name]) for name in raw)
    assert "moving average" in (tmp_path / "run" / "final" / "README.md").read_text()


@pytest.mark.parametrize("names, folder", [([], "logs/sspo/run"), (["tracker_project=proj", "tracker_run_name=first try"], "logs/proj/first try")])
def test_tensorboard_logs_under_the_project_and_run_names(names, folder, quick_base, tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", quick_base, "method=sft", "report_to=tensorboard", *names))
    trainer.accelerator.end_training()
    events = list((tmp_path / "run").rglob("events.out.tfevents*"))
    assert any(p.parent == tmp_path / "run" / folder for p in events)
    assert all((tmp_path / "run" / folder) in p.parents for p in events)  # the hyperparameters go to a subfolder of the run's


def test_validation_scores_a_prompt_file_with_eval_metrics_and_sends_the_samples_to_tensorboard(quick_base, clip_model_dir, clip_processor_dir, tmp_path,
                                                                                                caplog):
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle on the left, white background\n\na large blue square at the top, black background\n")
    run = tmp_path / "run"
    cfg = tiny_config(run, quick_base, "method=sft", "report_to=tensorboard", "validation.every_iterations=1", "validation.metrics=[shapes, pickscore]",
                      f"validation.prompt_file={prompts}", f"validation.scorer_paths.pickscore={clip_model_dir}",
                      f"validation.scorer_options.pickscore.processor={clip_processor_dir}")
    with caplog.at_level(logging.INFO, logger="sspo"):
        train(cfg)
    rows = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation at step")]
    assert said == [f"validation at step {row['step']}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "step") for row in rows]
    with caplog.at_level(logging.INFO, logger="sspo"):
        train(cfg, resume=True)  # finished already
    assert f"sft had already finished all 4 optimizer steps (raise iterations to train on); the final model is {run / 'final'}" in caplog.text
    assert all({"shapes", "shapes.color", "pickscore"} <= set(row) and 0 <= row["shapes"] <= 1 for row in rows)
    assert all(torch.isfinite(torch.tensor(row["pickscore"])) for row in rows)
    events = EventAccumulator(str(run / "logs" / "sspo" / "run"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("validation/pickscore")] == [2, 4]
    assert [e.step for e in events.Images("validation/samples")] == [2, 4]


@pytest.mark.parametrize("free, overrides, pool_adds", [
    (10**15, [], None), (1000, [], "2 more pool checkpoints"),
    (1000, ["method=spin", "checkpoints_total_limit=1"], "1 more pool checkpoint"),  # erd last: the one state's and the one just added
])
def test_a_disk_too_small_for_what_the_run_will_write_is_said_once_at_the_first_save(free, overrides, pool_adds, quick_base, tmp_path, monkeypatch, caplog):
    import collections
    import logging

    import sspo.training.checkpoints

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sspo.training.checkpoints.shutil, "disk_usage", lambda path: usage(free, 0, free))
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="sspo"):
        train(tiny_config(run, quick_base, "iterations=3", *overrides))
    warnings = [r.getMessage() for r in caplog.records if "free, but this run will write" in r.getMessage()]
    if free > 1000:
        assert warnings == []
        return
    assert len(warnings) == 1 and warnings[0].startswith(f"{run} has 0.0 MB free, but this run will write about ")
    state = sorted((run / "checkpoints").glob("step-*"))[0]
    pool = (run / "pool" / "checkpoint-003.safetensors").stat().st_size
    assert f"{pool_adds} of {pool / 1e6:.1f} MB, resumable" in warnings[0]
    assert f"resumable states of {sum(f.stat().st_size for f in state.rglob('*') if f.is_file()) / 1e6:.1f} MB each" in warnings[0]
    assert (run / "final").is_dir()  # a warning: the run goes on


def test_the_progress_bar_says_saving_until_the_iterations_state_is_saved_and_validating_after(quick_base, tmp_path, capsys, monkeypatch):
    """A user who stops the run once it says "validating" keeps the iteration (README: saved before it validates)."""
    import sspo.training.checkpoints

    saved, save_state = [], sspo.training.checkpoints.Checkpointing.save_state

    def noting(self):
        saved.append(capsys.readouterr().err)  # what the bar said up to this save
        return save_state(self)

    monkeypatch.setattr(sspo.training.checkpoints.Checkpointing, "save_state", noting)
    train(tiny_config(tmp_path / "run", quick_base, "method=sft", "validation.every_iterations=1", "validation.prompts=[a small red circle on the left]"))
    after = capsys.readouterr().err
    assert len(saved) == 2 and all(text.rstrip().endswith("saving]") and "validating" not in text.split("saving]")[-1] for text in saved)
    assert "validating]" in after


def test_a_resume_validates_the_saved_step_only_when_its_validation_did_not_finish(quick_base, tmp_path):
    run, prompts = tmp_path / "run", tmp_path / "prompts.txt"
    prompts.write_text("a small red circle on the left, white background\n")
    cfg = tiny_config(run, quick_base, "method=sft", "validation.every_iterations=1", "validation.metrics=[shapes]", f"validation.prompt_file={prompts}")
    train(cfg)
    log_file = run / "validation.jsonl"
    rows = log_file.read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [2, 4]
    shutil.rmtree(run / "final")  # stopped while validating step 4: saved, not yet validated
    log_file.write_text(rows[0] + "\n")
    train(cfg, resume=True)
    assert log_file.read_text().splitlines() == rows
    shutil.rmtree(run / "final")  # stopped after step 4's validation: nothing to do again
    train(cfg, resume=True)
    assert log_file.read_text().splitlines() == rows


@pytest.mark.parametrize("overrides, error", [
    (["validation.prompt_file=/nonexistent/prompts.txt"], "validation.prompt_file /nonexistent/prompts.txt: no such file"),
    (["validation.prompts=[a red dragon]"], "metric 'shapes' scores its world's prompts only (set validation.prompts to prompts of that world)"),
])
def test_validation_metrics_that_cannot_score_are_refused_before_training(overrides, error, quick_base, tmp_path):
    cfg = tiny_config(tmp_path / "run", quick_base, "validation.every_iterations=1", "validation.metrics=[shapes]", *overrides)
    with pytest.raises(SSPOError, match=re.escape(error)):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_a_validation_reward_model_that_cannot_load_is_refused_before_the_model_loads(quick_base, tmp_path, monkeypatch):
    import sspo.training.trainer

    monkeypatch.setattr(sspo.training.trainer, "load_pipeline", lambda *a, **kw: pytest.fail("the model loaded before the scorer was found unloadable"))
    (tmp_path / "empty").mkdir()
    cfg = tiny_config(tmp_path / "run", quick_base, "validation.every_iterations=1", "validation.metrics=[pickscore]", "validation.prompts=[a red dragon]",
                      f"validation.scorer_paths.pickscore={tmp_path / 'empty'}")
    with pytest.raises(ModelError) as caught:
        Trainer(cfg)
    assert str(caught.value).startswith(f"metric 'pickscore': cannot load the CLIP model from '{tmp_path / 'empty'}'")
    assert str(caught.value).endswith("(set validation.scorer_paths.pickscore to local weights; docs/scorers.md lists the files)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method, shown", [("sft", ["loss"]), ("dpo", ["loss"]), ("spin", ["loss", "checkpoint"]), ("sspo", ["loss", "ssr_rate", "checkpoint"])])
def test_the_progress_bar_shows_only_numbers_the_method_has(method, shown):
    from sspo.training.trainer import _postfix

    metrics = {"loss": 0.5, "ssr_rate": 0.25, "reference_checkpoint": 1.5, "pool_size": 3}
    assert list(_postfix(metrics, TrainConfig(method=method))) == shown


def test_a_resume_on_data_with_other_rows_or_edited_files_says_so(quick_base, tmp_path, caplog):
    import logging

    from sspo.worlds.shapes.world import make_split, write_imagefolder

    specs = make_split().train[:6]
    folder = write_imagefolder(tmp_path / "images", specs[:4])
    run = ["method=sft", "data.source=imagefolder", f"data.path={folder}", "iterations=1"]
    train(tiny_config(tmp_path / "run", quick_base, *run))
    with caplog.at_level(logging.WARNING, logger="sspo.training"):
        train(tiny_config(tmp_path / "run", quick_base, *run[:3], "iterations=2"), resume=True)
    assert "holds" not in caplog.text and "changed" not in caplog.text
    metadata = folder / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("circle", "square", 1))  # a caption edited in place: the same rows
    with caplog.at_level(logging.WARNING, logger="sspo.training"):
        train(tiny_config(tmp_path / "run", quick_base, *run[:3], "iterations=3"), resume=True)
    assert f"the files of the data ({folder}) changed since step-00000004 was saved" in caplog.text and "holds" not in caplog.text
    caplog.clear()
    write_imagefolder(tmp_path / "images", specs)  # two rows more
    with caplog.at_level(logging.WARNING, logger="sspo.training"):
        train(tiny_config(tmp_path / "run", quick_base, *run[:3], "iterations=4"), resume=True)
    assert f"the data ({folder}) holds 6 rows, 4 when step-00000006 was saved: the run goes on, but on other batches" in caplog.text


def test_a_launch_whose_processes_each_run_alone_is_refused(quick_base, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun started two, but accelerate found no way to join them
    with pytest.raises(ConfigError, match=r"^the launch started 2 processes, but accelerate runs each alone"):
        Trainer(tiny_config(tmp_path / "run", quick_base, "method=sft"))
    assert not any((tmp_path / "run").glob("*"))


def test_a_validation_that_fails_keeps_the_iterations_training(quick_base, tmp_path, monkeypatch):
    from sspo.training.run_state import saved_states

    run = tmp_path / "run"
    trainer = Trainer(tiny_config(run, quick_base, "validation.every_iterations=1", "validation.prompts=[a small red circle on the left]"))

    def failing():
        raise RuntimeError("the scorer ran out of memory")

    monkeypatch.setattr(trainer, "validate", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train()
    assert [int(state.name.removeprefix("step-")) for state in saved_states(run)] == [trainer.cfg.steps_per_iteration]


def test_deepspeed_gets_the_runs_clipping_and_micro_batch_and_skipping_non_finite_steps_is_refused(quick_base, tmp_path):
    import dataclasses
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    # DeepSpeed needs GPUs: its plugin as accelerate hands it over, before the engine reads its config.
    plugin = SimpleNamespace(zero_stage=2, deepspeed_config={"gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto",
                                                             "gradient_accumulation_steps": "auto"})
    accelerator = SimpleNamespace(num_processes=2, distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin),
                                  gradient_accumulation_steps=2)
    cfg = tiny_config(tmp_path / "run", quick_base, "optim.max_grad_norm=0.5", "optim.batch_size=3", "optim.gradient_accumulation_steps=2")
    Trainer._check_distributed(SimpleNamespace(accelerator=accelerator, cfg=cfg))
    assert plugin.deepspeed_config == {"gradient_clipping": 0.5, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}
    with pytest.raises(ConfigError, match=r"^config key 'nonfinite': skip is not available under DeepSpeed"):
        Trainer._check_distributed(SimpleNamespace(accelerator=accelerator, cfg=dataclasses.replace(cfg, nonfinite="skip")))
    plugin.deepspeed_config["gradient_accumulation_steps"] = 1  # as accelerate fills it in for a DeepSpeed JSON that leaves it out
    Trainer._check_distributed(SimpleNamespace(accelerator=accelerator, cfg=cfg))
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 2
    accelerator.gradient_accumulation_steps = 1  # as the launch passes an accelerate config file's value on
    with pytest.raises(ConfigError, match=r"^accelerate's launch asks for gradient accumulation 1 .* optim.gradient_accumulation_steps is 2;"):
        Trainer._check_distributed(SimpleNamespace(accelerator=accelerator, cfg=cfg))


def test_an_accumulation_the_launch_asks_for_is_refused_unless_it_is_the_configs(quick_base, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")  # accelerate's launch sets it from its config file
    with pytest.raises(ConfigError, match=r"^accelerate's launch asks for gradient accumulation 2 \(its config file's gradient_accumulation_steps"):
        Trainer(tiny_config(tmp_path / "run", quick_base))
    assert not (tmp_path / "run").exists()
    Trainer(tiny_config(tmp_path / "run", quick_base, "optim.gradient_accumulation_steps=2"))


def test_a_fully_fine_tuned_reference_at_the_policys_checkpoint_scores_as_the_policy_under_bf16(quick_base, tmp_path, bf16_runs):
    """Every step's reference is the checkpoint just added, the policy itself: both errors, so both
    differences, are exactly zero (a bf16 copy of the fp32 trained weights was off by ~1e-5)."""
    train(tiny_config(tmp_path / "run", quick_base, "method=spin", "model.lora=false", "mixed_precision=bf16", "steps_per_iteration=1",
                      "optim.learning_rate=1e-4"))
    rows = metrics(tmp_path / "run")
    assert [row["reference_checkpoint"] for row in rows] == [0.0, 1.0]
    assert all(row["dw"] == row["dl"] == 0.0 for row in rows)


def test_an_fp16_step_skipped_for_a_nonfinite_loss_closes_the_loss_scaler_step(monkeypatch):
    """fp16 needs a GPU, so the GradScaler accelerate makes there is set up by hand on the CPU; the
    step after a skipped one used to fail in the scaler ("unscale_() has already been called")."""
    from types import MethodType, SimpleNamespace

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(accelerator, "scaler", torch.amp.GradScaler("cpu"))
    monkeypatch.setattr(accelerator, "native_amp", True)
    monkeypatch.setattr(accelerator.state, "_mixed_precision", "fp16")
    model = torch.nn.Linear(4, 1)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    losses = iter([float("nan"), 1.0])

    def loss(trainer, batch):
        value = model(torch.ones(1, 4)).sum() * next(losses)
        return value, {"loss": value.detach()}

    trainer = SimpleNamespace(accelerator=accelerator, denoiser=model, params=list(model.parameters()), optimizer=optimizer,
                              lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), ema=None, nonfinite_skips=0,
                              cfg=SimpleNamespace(optim=SimpleNamespace(max_grad_norm=1.0), nonfinite="skip"), global_step=0,
                              example_prompt=None, device=torch.device("cpu"))
    trainer.loss = MethodType(loss, trainer)
    trainer._mean_over_processes = MethodType(Trainer._mean_over_processes, trainer)
    batch = SimpleNamespace(rows=SimpleNamespace(prompts=["a prompt"]))
    skipped = Trainer.optimizer_step(trainer, [batch])
    before = model.weight.detach().clone()
    stepped = Trainer.optimizer_step(trainer, [batch])
    assert skipped["nonfinite_skips"] == stepped["nonfinite_skips"] == 1
    assert skipped["loss_scale"] == 65536.0 / 2  # the scaler saw the overflow and halved its scale
    assert not torch.equal(model.weight, before)  # and the next step trained


def test_own_captions_on_a_worlds_tiny_base_are_named_in_the_dry_run(quick_base, tmp_path, caplog):
    """The shapes base knows its world's words only: "a photo of my cat" trains on subword fragments."""
    import logging

    from sspo.worlds.shapes.world import make_split, write_imagefolder

    folder = write_imagefolder(tmp_path / "images", make_split().train[:4])
    own = ["method=sft", "data.source=imagefolder", f"data.path={folder}"]
    with caplog.at_level(logging.WARNING, logger="sspo"):
        dry_run(tiny_config(tmp_path / "run", quick_base, *own))
    assert "prompts of the shapes world" not in caplog.text  # the world's own captions
    metadata = folder / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace(json.loads(metadata.read_text().splitlines()[0])["text"], "a photo of my cat", 1))
    with caplog.at_level(logging.WARNING, logger="sspo"):
        dry_run(tiny_config(tmp_path / "run", quick_base, *own))
    assert ("1 of the first 4 captions is not a prompt of the shapes world (e.g. 'a photo of my cat'), and shapes-base:quick knows only "
            "its world's words; for data of your own, set model.pretrained to a real model") in caplog.text


def test_data_smaller_than_one_micro_batch_is_named_in_the_dry_run(quick_base, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="sspo"):
        dry_run(tiny_config(tmp_path / "run", quick_base, "data.max_samples=3", "optim.batch_size=4"))
        dry_run(tiny_config(tmp_path / "run", quick_base, "data.max_samples=4", "optim.batch_size=4"))
    assert [r.getMessage() for r in caplog.records if "micro-batch" in r.getMessage()] == [
        "the data holds 3 rows, fewer than one micro-batch (optim.batch_size 4): each batch repeats rows; lower optim.batch_size, or add rows"]


def test_the_dry_run_names_the_settings_left_to_the_model(quick_base, tmp_path):
    chosen = dry_run(tiny_config(tmp_path / "run", quick_base, "beta=700", "negatives.scheduler=ddim", "negatives.guidance_scale=3"))
    assert "defaults" not in chosen and "beta         700" in chosen
    left = dry_run(tiny_config(tmp_path / "run", quick_base, "beta=null", "negatives.scheduler=null", "negatives.guidance_scale=null"))
    assert "beta=5000, negatives.scheduler=ddim, negatives.guidance_scale=5: left unset, so the model's usual values" in left
    sft = dry_run(tiny_config(tmp_path / "run", quick_base, "method=sft", "beta=null", "negatives.guidance_scale=null"))
    assert "defaults" not in sft  # SFT has neither a reference nor negatives


def test_a_resume_by_another_number_of_processes_is_refused(quick_base, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, quick_base, "method=sft", "iterations=1"))
    state_file = sorted((run / "checkpoints").glob("step-*/trainer_state.json"))[-1]
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps(state | {"processes": 2, "replicas": state["replicas"] * 2}))  # as a 2-process launch saves it
    with pytest.raises(ConfigError, match=re.escape(f"--resume: {run} was trained by 2 processes, this launch runs 1; resume it with 2 "
                                                    "(accelerate launch --num_processes 2), or train into a new output_dir")):
        train(tiny_config(run, quick_base, "method=sft", "iterations=2"), resume=True)
    with pytest.raises(ConfigError, match=re.escape(f"--resume: {run} was trained by 2 processes, this launch runs 1")):
        dry_run(tiny_config(run, quick_base, "method=sft", "iterations=2"), resume=True)


def test_a_resume_that_would_end_before_the_step_reached_is_refused(quick_base, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, quick_base, "method=sft", "iterations=2", "steps_per_iteration=2"))
    card = (run / "final" / "README.md").read_text()
    for resume in (dry_run, train):
        with pytest.raises(ConfigError, match=re.escape(f"--resume: {run} has trained 4 optimizer steps, past iterations=1 x 2 = 2; set iterations=2 or more")):
            resume(tiny_config(run, quick_base, "method=sft", "iterations=1", "steps_per_iteration=2"), resume=True)
    assert (run / "final" / "README.md").read_text() == card


def test_a_resume_that_changes_the_length_of_a_decaying_schedule_is_refused(quick_base, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, quick_base, "method=sft", "iterations=1", "optim.lr_scheduler=linear"))
    card = (run / "final" / "README.md").read_text()
    for resume in (dry_run, train):
        with pytest.raises(ConfigError, match=re.escape("--resume: iterations 1 -> 2: optim.lr_scheduler linear decays over the run's length")):
            resume(tiny_config(run, quick_base, "method=sft", "iterations=2", "optim.lr_scheduler=linear"), resume=True)
    assert (run / "final" / "README.md").read_text() == card


def test_image_sizes_the_denoiser_cannot_take_are_refused_before_anything_is_read_or_written(tiny_sd3, tmp_path, monkeypatch):
    import sspo.training.trainer

    monkeypatch.setattr(sspo.training.trainer, "open_dataset", lambda *args, **kwargs: pytest.fail("the data was read"))
    # The tiny SD3's VAE scales by 4 and its position embedding covers 8 patches of 2: sides up to 64 px.
    sd3 = ("negatives.scheduler=pipeline", "model.lora_targets=[to_q, to_k, to_v, to_out.0]", "data.cache_latents=true")
    too_large = "data.resolution: sd3's position embedding covers image sides up to 64 px, not 72x72; set data.resolution so that no side is above 64"
    for start in (dry_run, lambda cfg: Trainer(cfg)):
        with pytest.raises(ModelError, match=re.escape(too_large)):
            start(tiny_config(tmp_path / "run", tiny_sd3, *sd3, "data.resolution=72", f"data.cache_dir={tmp_path / 'latents'}"))
        with pytest.raises(ModelError, match=r"^data.resolution: sd3's position embedding covers image sides up to 64 px, not 48x80"):
            start(tiny_config(tmp_path / "run", tiny_sd3, *sd3, "data.resolution=64", "data.buckets=true", "data.bucket_step=16",
                              "data.cache_latents=false", "data.world_pairs_per_prompt=1"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "latents").exists()


def test_each_process_trains_on_its_own_rows_with_its_own_random_stream():
    from types import SimpleNamespace

    def process(rank):
        return SimpleNamespace(cfg=SimpleNamespace(optim=SimpleNamespace(batch_size=4)), accelerator=SimpleNamespace(num_processes=2, process_index=rank),
                               epoch_length=64, _epoch_order=lambda epoch: torch.arange(64))

    rows = [{row for row, _ in Trainer._placements(process(rank), 3)} for rank in (0, 1)]
    assert len(rows[0]) == len(rows[1]) == 4 and not rows[0] & rows[1]
    assert Trainer._stream(process(0), 3) != Trainer._stream(process(1), 3)


def test_every_epoch_has_its_own_row_order():
    from types import SimpleNamespace

    asked = []
    dataset = SimpleNamespace(epoch_order=lambda epoch, seed, batch: asked.append(epoch) or torch.randperm(8, generator=torch.Generator().manual_seed(seed + epoch)))
    trainer = SimpleNamespace(dataset=dataset, _epoch_orders={}, cfg=SimpleNamespace(seed=0, optim=SimpleNamespace(batch_size=1)))
    orders = [Trainer._epoch_order(trainer, epoch).tolist() for epoch in range(3)]
    assert asked == [0, 1, 2] and orders[0] != orders[1] != orders[2]


def test_validation_also_runs_after_the_last_iteration_off_its_cadence(quick_base, tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(Trainer, "validate", lambda self: steps.append(self.global_step) or {})
    train(tiny_config(tmp_path / "run", quick_base, "method=sft", "iterations=3", "validation.every_iterations=2",
                      "validation.prompts=[a small red circle on the left]"))
    assert steps == [4, 6]


def test_logged_metrics_are_the_mean_over_accumulated_micro_batches(quick_base, tmp_path, monkeypatch):
    seen, loss = [], Trainer.loss

    def recorded(self, batch):
        value, metrics_ = loss(self, batch)
        seen.append(float(metrics_["loss"]))
        return value, metrics_

    monkeypatch.setattr(Trainer, "loss", recorded)
    train(tiny_config(tmp_path / "run", quick_base, "optim.gradient_accumulation_steps=2"))
    assert [row["loss"] for row in metrics(tmp_path / "run")] == pytest.approx([(a + b) / 2 for a, b in zip(seen[::2], seen[1::2])], rel=1e-6)


def test_only_the_newest_checkpoints_total_limit_states_are_kept(quick_base, tmp_path):
    from sspo.training.run_state import saved_states

    train(tiny_config(tmp_path / "run", quick_base, "method=sft", "iterations=3", "checkpoints_total_limit=1"))
    assert [state.name for state in saved_states(tmp_path / "run")] == ["step-00000006"]


def test_the_count_of_skipped_steps_goes_on_across_a_resume(quick_base, tmp_path):
    diverging = ("method=sft", "optim.learning_rate=1e9", "nonfinite=skip")
    train(tiny_config(tmp_path / "run", quick_base, *diverging, "iterations=1"))
    assert metrics(tmp_path / "run")[-1]["nonfinite_skips"] > 0
    train(tiny_config(tmp_path / "run", quick_base, *diverging, "iterations=2"), resume=True)
    train(tiny_config(tmp_path / "whole", quick_base, *diverging, "iterations=2"))
    assert [row["nonfinite_skips"] for row in metrics(tmp_path / "run")] == [row["nonfinite_skips"] for row in metrics(tmp_path / "whole")]
