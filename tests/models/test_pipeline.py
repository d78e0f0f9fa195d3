"""Loading pipelines: by hub id, an unreachable hub is one clear error at once, not a minute of retries;
from a folder, a damaged model_index.json is one line naming the entry."""

import json
import time
from pathlib import Path

import pytest

from sspo.cli import main
from sspo.models import pipeline


def test_an_unreachable_hub_fails_at_once_naming_the_id_and_the_fix(unreachable_hub, tmp_path, capsys):
    started = time.monotonic()
    assert main(["sample", "--model", "someone/some-model", "--prompt", "a cat", "--out", str(tmp_path / "grid.png")]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err.strip()
    assert err == ("sspo: error: cannot load 'someone/some-model': the Hugging Face hub (http://127.0.0.1:9) is unreachable; download it where "
                   "the hub is reachable (`hf download someone/some-model`; a gated model such as FLUX.1-dev needs its license accepted on the hub "
                   "and `hf auth login` first) and pass its folder, or fill the cache there and set HF_HUB_OFFLINE=1")


def test_offline_mode_loads_from_the_cache_without_asking_the_hub(unreachable_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(pipeline, "hub_reachable", lambda: pytest.fail("offline mode asked the hub"))
    pipeline.check_hub("someone/some-model")


def test_a_local_folder_never_asks_the_hub(quick_base, monkeypatch):
    monkeypatch.setattr(pipeline, "hub_reachable", lambda: pytest.fail("a folder asked the hub"))
    assert pipeline.load_pipeline_config(quick_base)["_class_name"] == "StableDiffusionPipeline"


def test_a_hub_warning_is_printed_once():
    import subprocess
    import sys

    code = ("import logging; from sspo.logs import set_up_logging; set_up_logging(verbose=False); "
            "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.count("Retrying in 1s") == 1, err


def test_a_denoiser_skeleton_leaves_the_global_rng_as_it_was(quick_base):
    # A run checks its model's files after seeding; the LoRA it then makes draws from the same RNG.
    import torch

    torch.manual_seed(0)
    before = torch.get_rng_state()
    skeleton = pipeline.denoiser_skeleton(quick_base, pipeline.load_pipeline_config(quick_base), "unet")
    assert next(skeleton.parameters()).is_meta and torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("entry, what", [
    ("x", "not [library, class] naming a class of this diffusers"),  # once an IndexError
    (["diffusers", 5], "not [library, class] (e.g."),  # a TypeError
    (["diffusers", "NoSuchModel"], "not [library, class] naming a class of this diffusers"),  # an AttributeError
])
@pytest.mark.parametrize("command", ["train", "sample"])
def test_a_damaged_model_index_entry_is_one_line_naming_it(entry, what, command, quick_base, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for component in Path(quick_base).iterdir():
        if component.is_dir():
            (model / component.name).symlink_to(component)
    index = json.loads((Path(quick_base) / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps(index | {"unet": entry}))
    args = {"train": ["train", "demo-shapes", f"model.pretrained={model}", f"output_dir={tmp_path / 'run'}", "--dry-run"],
            "sample": ["sample", "--model", str(model), "--prompt", "a red circle", "--out", str(tmp_path / "grid.png")]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sspo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"sspo: error: model_index.json of model {model}: entry 'unet' is {json.dumps(entry)}, {what}")
    assert lines[0].endswith("copy or download the model again" + (", or upgrade diffusers if the class is newer" if "naming" in what else ""))
