"""``sspo train --dry-run``: config, data columns and model folder checked, a summary printed, nothing trained."""

from pathlib import Path

import pytest

from sspo.cli import main
from sspo.io import write_parquet
from sspo.worlds.shapes.world import make_split, preference_pairs, write_imagefolder

from tiny_pipelines import build_sdxl_pipeline

SD15 = str(Path(__file__).resolve().parents[2] / "configs" / "sd15-lora.yaml")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    rows = preference_pairs(make_split().train[:6], per_spec=1, seed=0)
    return write_parquet(tmp_path_factory.mktemp("data") / "pairs.parquet", rows)


def test_dry_run_prints_a_summary_and_trains_nothing(quick_base, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", SD15, "--dry-run", f"model.pretrained={quick_base}", f"data.path={pairs}", f"output_dir={out}"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "config, data and model OK" in summary
    assert "(StableDiffusionPipeline)" in summary
    assert "sspo: Self-Sampling" in summary
    assert "10 iterations x 200 = 2000 optimizer steps" in summary
    assert "8 per process x 8 accumulation x 1 process = 64 effective" in summary
    assert "'uniform' per batch" in summary
    assert "6 rows of pairs" in summary
    assert not out.exists()


@pytest.mark.parametrize("resolution, far", [(512, True), (64, False)])
def test_a_resolution_far_from_the_models_own_size_is_a_warning(resolution, far, quick_base, pairs, tmp_path, caplog):
    argv = ["train", SD15, "--dry-run", f"model.pretrained={quick_base}", f"data.path={pairs}", f"data.resolution={resolution}", f"output_dir={tmp_path / 'run'}"]
    with caplog.at_level("WARNING", logger="sspo"):
        assert main(argv) == 0
    warning = f"data.resolution {resolution} is far from the 32 px this model was made for (its denoiser's sample_size x its VAE's scale)"
    assert (warning in caplog.text) == far  # twice the size or half of it is a choice, not a slip


def test_a_run_warns_of_a_resolution_far_from_the_models_size_before_it_reads_data(quick_base, tmp_path, monkeypatch, caplog):
    from sspo.errors import TrainingError
    from sspo.training import trainer

    from test_trainer import tiny_config

    def stop(cfg, **kwargs):
        raise TrainingError("stopped where the data is opened")

    monkeypatch.setattr(trainer, "open_dataset", stop)
    with caplog.at_level("WARNING", logger="sspo"), pytest.raises(TrainingError, match="stopped where the data is opened"):
        trainer.train(tiny_config(tmp_path / "run", quick_base, "data.resolution=512"))
    assert caplog.text.count("data.resolution 512 is far from the 32 px this model was made for") == 1


def test_dry_run_reads_an_sdxl_folder(pairs, tmp_path, capsys):
    model = build_sdxl_pipeline(tmp_path / "sdxl")
    assert main(["train", SD15, "--dry-run", f"model.pretrained={model}", f"data.path={pairs}"]) == 0
    assert "(StableDiffusionXLPipeline)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.caption_column=prompt"], "has no column 'prompt' (set data.caption_column)"),
        (["data.path={tmp}/missing.parquet"], "missing.parquet does not exist"),
        (["model.pretrained={tmp}"], "no model_index.json there"),
        (["model.pretrained={tmp}/missing"], "missing does not exist; pass a hub id"),
        (["model.lora_targets=[to_q, to_x]"], "'to_x' names no layer of the UNet that LoRA can wrap"),
        (["model.family=flux"], "model.family 'flux' does not fit this StableDiffusionPipeline: it has no transformer, text_encoder_2; set model.family to auto"),
        (["method=dpo", "data.source=imagefolder", "data.path={images}"], "needs (winner, loser) pairs"),
        (["data.streaming=true"], "unknown config key 'data.streaming'"),
        (["data.frames=8"], "'data.frames': is 8 (clips), but the model makes images; set data.frames=0"),
        (["validation.metrics=[moving-shapes]", "validation.every_iterations=1"],
         "validation.metrics: 'moving-shapes' does not score the images this model makes; pick metrics of images (pickscore, hpsv2, hpsv21, "
         "imagereward, aesthetic, clip, shapes)"),
    ],
)
def test_dry_run_errors_are_one_line(overrides, message, quick_base, pairs, tmp_path, capsys):
    images = write_imagefolder(tmp_path / "images", make_split().train[:2])
    base = [f"model.pretrained={quick_base}", f"data.path={pairs}"]
    argv = ["train", SD15, "--dry-run", *base, *(o.format(tmp=tmp_path, images=images) for o in overrides)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sspo: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in err


def test_frames_for_an_image_world_are_refused(tmp_path, capsys):
    assert main(["train", "demo-shapes", "--dry-run", "data.frames=8", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "config key 'data.frames': source shapes is images: set data.frames=0" in capsys.readouterr().err


def test_dry_run_opens_no_image(quick_base, pairs, tmp_path, capsys, monkeypatch):
    import sspo.data.images

    monkeypatch.setattr(sspo.data.images, "load_image", lambda *a, **k: pytest.fail("an image was opened"))
    assert main(["train", SD15, "--dry-run", f"model.pretrained={quick_base}", f"data.path={pairs}"]) == 0
    assert "6 rows of pairs" in capsys.readouterr().out


def test_a_dry_run_with_resume_checks_the_resume_as_the_real_run_does(finished_run, quick_base, capsys):
    from test_trainer import DEMO, tiny_overrides

    argv = ["train", str(DEMO), *tiny_overrides(finished_run, quick_base), "--resume", "--dry-run"]
    assert main(argv) == 0
    assert f"resume       from {finished_run / 'checkpoints'}" in capsys.readouterr().out
    assert main([*argv, "optim.learning_rate=5e-4"]) == 2
    assert "--resume: the config differs from the one" in capsys.readouterr().err


def test_a_dry_run_with_resume_names_the_state_the_real_resume_takes_when_the_newest_is_damaged(finished_run, quick_base, tmp_path, capsys, caplog):
    import shutil

    from sspo.training.run_state import saved_states

    from test_trainer import DEMO, tiny_overrides

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    older, newest = saved_states(run)
    weights = next(newest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["train", str(DEMO), *tiny_overrides(run, quick_base), "--resume", "--dry-run"]) == 0
    assert f"resume       from {older}\n" in capsys.readouterr().out
    assert f"resuming from the older state {older}: {newest} cannot be resumed: " in caplog.text and weights.name in caplog.text


def test_a_dry_run_of_the_flow_base_says_what_it_is_and_samples_at_its_guidance(tmp_path, capsys):
    argv = ["train", "demo-shapes", "--dry-run", "model.pretrained=shapes-base:flow", "negatives.scheduler=pipeline",
            "model.lora_targets=[to_q, to_k, to_v, to_out.0]", f"output_dir={tmp_path / 'run'}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "shapes-base:flow (the shapes world's tiny flow-matching SD3 pipeline" in out
    assert "negatives: pipeline, 20 steps, guidance 1" in out


@pytest.mark.parametrize("overrides, message", [
    (["model.lora_targets=[to_q, to_k, to_v, to_out.0]", "negatives.scheduler=ddim"], "negatives.scheduler 'ddim' is a diffusion sampler; sd3 samples by flow matching"),
    (["negatives.scheduler=pipeline"], "'conv1', 'conv2', 'time_emb_proj' name no layer of the transformer"),
])
def test_a_dry_run_checks_a_shipped_world_base_as_the_run_does(overrides, message, tmp_path, capsys):
    assert main(["train", "demo-shapes", "--dry-run", "model.pretrained=shapes-base:flow", *overrides, f"output_dir={tmp_path / 'run'}"]) == 2
    assert message in capsys.readouterr().err


def test_a_dry_run_refuses_more_frames_than_the_shipped_video_base_takes(tmp_path, capsys):
    assert main(["train", "demo-moving-shapes", "--dry-run", "data.frames=33", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "'data.frames': is 33, but this model's motion modules make clips of at most 32 frames" in capsys.readouterr().err


def test_one_iteration_of_one_step_is_said_in_the_singular(quick_base, pairs, tmp_path, capsys):
    assert main(["train", SD15, "--dry-run", f"model.pretrained={quick_base}", f"data.path={pairs}", f"output_dir={tmp_path / 'run'}",
                 "iterations=1", "steps_per_iteration=1"]) == 0
    assert "1 iteration x 1 = 1 optimizer step\n" in capsys.readouterr().out


def test_settings_the_model_ignores_are_named_in_one_warning(quick_base, pairs, tmp_path, caplog):
    overrides = [f"model.pretrained={quick_base}", f"data.path={pairs}", f"output_dir={tmp_path / 'run'}"]
    with caplog.at_level("WARNING"):
        assert main(["train", SD15, "--dry-run", *overrides, "flow.weighting_scheme=cosmap", "negatives.scheduler=dpm++", "negatives.eta=0.5"]) == 0
    [warning] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignored for this model")]
    assert warning == ("ignored for this model: flow.* (flow-matching models' keys; sd is trained by denoising); "
                       "negatives.eta (ddim's; negatives.scheduler is dpm++)")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["train", SD15, "--dry-run", *overrides]) == 0
    assert "ignored for this model" not in caplog.text
    with caplog.at_level("WARNING"):  # an SD3 model: flow's keys apply, but it has no guidance embedding
        assert main(["train", "demo-shapes", "--dry-run", "model.pretrained=shapes-base:flow", "model.lora_targets=[to_q, to_k, to_v, to_out.0]",
                     "flow.guidance_scale=9", f"output_dir={tmp_path / 'run'}"]) == 0
    assert "ignored for this model: flow.guidance_scale (a guidance embedding's input, as FLUX.1-dev has; this sd3 model has none)" in caplog.text
