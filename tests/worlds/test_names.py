"""Model names: a world's base, a run's final model, any other pipeline, and the guidance each is sampled with."""

import shutil

import pytest

from sspo.errors import ConfigError
from sspo.worlds.names import resolve_model, usual_guidance_scale


def test_a_runs_fully_fine_tuned_model_samples_at_its_runs_guidance(quick_base, tmp_path):
    final = shutil.copytree(quick_base, tmp_path / "run" / "final")  # a StableDiffusionPipeline: its family's usual is 7.5
    assert usual_guidance_scale(str(final)) == 7.5
    (tmp_path / "run" / "config.yaml").write_text("method: sft\nnegatives:\n  guidance_scale: 5.0\n")
    assert usual_guidance_scale(str(final)) == 5.0
    elsewhere = shutil.copytree(final, tmp_path / "elsewhere" / "model")  # the same weights outside a run: the family's
    (tmp_path / "elsewhere" / "config.yaml").write_text("negatives:\n  guidance_scale: 5.0\n")
    assert usual_guidance_scale(str(elsewhere)) == 7.5


def test_a_world_base_given_by_its_folder_samples_at_its_worlds_guidance(quick_base, tmp_path):
    from sspo.worlds import WORLDS

    assert usual_guidance_scale(quick_base) == usual_guidance_scale("shapes-base:quick") == 5.0  # the family's usual would be 7.5
    assert usual_guidance_scale(str(WORLDS["shapes"].find_base("flow"))) == usual_guidance_scale("shapes-base:flow") == 1.0  # the shipped folder
    assert usual_guidance_scale(str(shutil.copytree(quick_base, tmp_path / "mine"))) == 7.5  # a copy is any other pipeline


@pytest.mark.parametrize("name, suggested", [("shapes-bse", "shapes-base"), ("moving-shape-base:quick", "moving-shapes-base")])
def test_a_misspelt_base_name_is_named_with_the_base_it_is_close_to(name, suggested):
    with pytest.raises(ConfigError, match=rf"--model '{name}' is neither a folder nor a world's base; did you mean '{suggested}'\?"):
        resolve_model(name, key="--model")


@pytest.mark.parametrize("name", ["runwayml/stable-diffusion-v1-5", "my-own-model"])
def test_hub_ids_and_other_names_are_not_taken_for_a_misspelt_base(name):
    assert resolve_model(name) == name
