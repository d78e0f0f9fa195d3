"""The shapes world's flow-matching base (``shapes-base:flow``): a stock StableDiffusion3Pipeline,
bitwise rebuildable, shipped for the default size, trained by every method like any SD3 model."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from sspo.worlds.names import resolve_model, usual_guidance_scale
from sspo.worlds.shapes.flow_base import PACKAGED_FLOW_BASE, FlowBaseConfig, build_flow_base


@pytest.fixture(scope="session")
def flow_quick() -> str:
    return resolve_model("shapes-base:flow-quick")


def _weight_hashes(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("*/*.safetensors"))}


def test_quick_flow_base_is_an_sd3_pipeline_plain_diffusers_loads(flow_quick):
    code = (
        "import sys\n"
        "from diffusers import StableDiffusion3Pipeline\n"
        f"pipe = StableDiffusion3Pipeline.from_pretrained({flow_quick!r}, text_encoder_3=None, tokenizer_3=None)\n"
        "out = pipe('a large red circle on the left, white background', num_inference_steps=2, guidance_scale=1.0, output_type='np').images\n"
        "assert out.shape == (1, 32, 32, 3), out.shape\n"
        "assert not any(m == 'sspo' or m.startswith('sspo.') for m in sys.modules)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
    assert usual_guidance_scale("shapes-base:flow-quick") == 1.0 and usual_guidance_scale("shapes-base:quick") == 5.0


def test_quick_flow_build_is_bitwise_repeatable(flow_quick, tmp_path):
    again = build_flow_base(FlowBaseConfig.preset("flow-quick"), tmp_path / "again", force=True)
    assert {name.split("/")[0] for name in _weight_hashes(flow_quick)} == {"text_encoder", "text_encoder_2", "transformer", "vae"}
    assert _weight_hashes(again) == _weight_hashes(flow_quick)


def test_a_flow_build_is_the_same_whether_its_image_base_was_cached_or_built_then(tmp_path, monkeypatch):
    import dataclasses

    import torch

    from sspo.worlds.shapes import flow_base

    cfg = dataclasses.replace(FlowBaseConfig.preset("flow-quick"), denoiser_steps=2)
    cached = build_flow_base(cfg, tmp_path / "cached")
    image_base = flow_base.build_base
    monkeypatch.setattr(flow_base, "build_base", lambda config: (torch.rand(5), image_base(config))[1])  # a build draws from torch's RNG
    assert _weight_hashes(build_flow_base(cfg, tmp_path / "built")) == _weight_hashes(cached)


def test_every_method_trains_on_the_flow_base(flow_quick, tmp_path):
    from sspo.training.trainer import train

    from test_trainer import tiny_config

    flow = ["negatives.scheduler=pipeline", "model.lora_targets=[to_q, to_k, to_v, to_out.0]", "iterations=1"]
    for method in ("sft", "dpo", "sspo"):
        final = train(tiny_config(tmp_path / method, flow_quick, f"method={method}", *flow))
        assert (final / "pytorch_lora_weights.safetensors").is_file()
        assert "text_encoder_3=None, tokenizer_3=None, dtype=dtype)" in (final / "README.md").read_text()


def test_shipped_flow_base_is_the_current_recipe():
    assert build_flow_base(FlowBaseConfig()) == PACKAGED_FLOW_BASE, "rebuild it: sspo base --size flow --force --out sspo/worlds/shapes/weights/shapes-base-flow"
    assert sum(p.stat().st_size for p in PACKAGED_FLOW_BASE.rglob("*") if p.is_file()) <= 10 * 2**20
