"""What a run leaves for people: validation grids (PNG and tensorboard) and a model card beside the weights."""

import os
import subprocess
import sys

from PIL import Image

from sspo.config import from_dict
from sspo.io import write_parquet
from sspo.training.config import TrainConfig
from sspo.training.model_card import model_card
from sspo.training.trainer import train
from sspo.worlds.shapes.world import make_split, preference_pairs

PROMPTS = ["a large red circle on the left, white background", "a small blue square at the top, black background"]


def test_validation_grids_and_model_card(quick_base, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_parquet(tmp_path / "pairs.parquet", preference_pairs(make_split().train[:4], per_spec=1, seed=0))
    run = tmp_path / "run"
    cfg = from_dict(TrainConfig, {
        "model": {"pretrained": quick_base},
        "data": {"source": "parquet", "path": str(data), "resolution": 32},
        "optim": {"batch_size": 2},
        "negatives": {"steps": 2},
        "validation": {"prompts": PROMPTS, "every_iterations": 1},
        "iterations": 2,
        "steps_per_iteration": 1,
        "output_dir": str(run),
        "report_to": "tensorboard",
    })
    final = train(cfg)

    grids = sorted((run / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-00000001.png", "step-00000002.png"]
    assert Image.open(grids[0]).width > 2 * 96  # a row label and one cell per prompt
    events = EventAccumulator(str(next(run.glob("logs/**/events.out.tfevents*")).parent), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("validation/grid")] == [1, 2]

    card = (final / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\ntags:\n")  # no base_model: a local folder is no hub model
    assert f'DiffusionPipeline.from_pretrained("{quick_base}"' in card
    assert f'pipe.load_lora_weights("{final.resolve()}")' in card
    assert "![validation grid](validation.png)" in card and PROMPTS[0] in card
    assert (final / "validation.png").read_bytes() == grids[-1].read_bytes()
    # Its code runs as written, in stock diffusers, and samples as the run's validation did.
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert "num_inference_steps=2, guidance_scale=5, height=32, width=32" in code  # the size it trained and validated at
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is deprecated" not in done.stderr  # the keywords this diffusers asks for (dtype, not torch_dtype)
    assert Image.open(tmp_path / "sample.png").size == (32, 32)


def test_full_finetune_card_loads_the_folder():
    cfg = from_dict(TrainConfig, {"model": {"lora": False}, "method": "sft"})
    card = model_card(cfg, base="base/model", video=False, folder="/runs/x/final", processes=8, grid=None, prompt='a "quoted" prompt')
    assert 'pipe = DiffusionPipeline.from_pretrained("/runs/x/final"' in card and 'pipe("a \\"quoted\\" prompt", num_inference_steps=' in card
    assert "load_lora_weights" not in card and "Validation" not in card
    assert "\nbase_model: base/model\n" in card  # a hub id
    assert "4 per process x 1 accumulation x 8 processes = 32 effective" in card
    assert "| fine-tuning | full denoiser (every layer) |" in card


def test_the_card_of_an_image_model_with_motion_modules_names_the_adapter_wherever_its_code_runs(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()  # macOS's /var is /private/var
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters" / "motion").mkdir(parents=True)
    cfg = from_dict(TrainConfig, {"model": {"pretrained": "some/sd15", "motion_adapter": "adapters/motion", "revision": "main"},
                                  "data": {"frames": 8}, "negatives": {"guidance_scale": 7.5, "scheduler": "ddim"}, "beta": 5000.0})
    card = model_card(cfg, base="some/sd15", video=True, folder="/runs/x/final", processes=1, grid=None, prompt='a "red"\ncircle\\')
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "card", "exec")  # any prompt or path is a string literal there
    assert f'MotionAdapter.from_pretrained("{tmp_path / "adapters" / "motion"}", dtype=dtype)' in code
    assert 'AnimateDiffPipeline.from_pretrained("some/sd15", motion_adapter=adapter, revision="main", dtype=dtype)' in code
    assert 'pipe("a \\"red\\"\\ncircle\\\\", num_inference_steps=20, guidance_scale=7.5' in code and "num_frames=8" in code


def test_the_card_of_a_world_base_names_the_command_that_prints_that_base():
    for name, command in [("shapes-base", "sspo base --world shapes"), ("shapes-base:flow", "sspo base --world shapes --size flow"),
                          ("moving-shapes-base:quick", "sspo base --world moving-shapes --size quick")]:
        cfg = from_dict(TrainConfig, {"model": {"pretrained": name}, "negatives": {"guidance_scale": 5.0}, "beta": 500.0})
        card = model_card(cfg, base="/bases/x", video=False, folder="/runs/x/final", processes=1, grid=None, prompt="a prompt")
        assert f"# {name}: the {name.split('-base')[0]} world's base on this machine; elsewhere, the folder `{command}` prints\n" in card
