"""Model names: a world's base, a run's final model, any other pipeline, and the guidance each is sampled with."""

import shutil

from sspo.worlds.names import usual_guidance_scale


def test_a_runs_fully_fine_tuned_model_samples_at_its_runs_guidance(quick_base, tmp_path):
    final = shutil.copytree(quick_base, tmp_path / "run" / "final")  # a StableDiffusionPipeline: its family's usual is 7.5
    assert usual_guidance_scale(str(final)) == 7.5
    (tmp_path / "run" / "config.yaml").write_text("method: sft\nnegatives:\n  guidance_scale: 5.0\n")
    assert usual_guidance_scale(str(final)) == 5.0
    elsewhere = shutil.copytree(final, tmp_path / "elsewhere" / "model")  # the same weights outside a run: the family's
    (tmp_path / "elsewhere" / "config.yaml").write_text("negatives:\n  guidance_scale: 5.0\n")
    assert usual_guidance_scale(str(elsewhere)) == 7.5
