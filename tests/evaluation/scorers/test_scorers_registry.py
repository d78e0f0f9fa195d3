"""The registry, the shared Scorer contract, file resolution errors, and the shapes world's exact scorer."""

import random

import pytest
import torch
from PIL import Image

from sspo.errors import ModelError, SSPOError
from sspo.evaluation.scorers import PAPER_METRICS, Scorer, build_scorer, scorer_names
from sspo.evaluation.scorers.base import resolve_file
from sspo.models import pipeline
from sspo.worlds import WORLDS
from sspo.worlds.shapes import world as shapes

from scorer_models import PROMPTS


def test_registry_names_and_unknown_scorer():
    assert set(scorer_names()) == {"pickscore", "hpsv2", "hpsv21", "imagereward", "aesthetic", "clip", *WORLDS}  # each world scores its own
    assert set(PAPER_METRICS) <= set(scorer_names())
    with pytest.raises(SSPOError, match="unknown scorer 'pick'.*pickscore"):
        build_scorer("pick")


def test_unknown_option_is_a_clear_error(clip_model_dir):
    with pytest.raises(SSPOError, match=r"^scorer 'clip' takes no option 'procesor'; docs/scorers.md lists each scorer's options$"):
        build_scorer("clip", str(clip_model_dir), procesor="x")


class _Length(Scorer):
    name = "length"

    def _score_batch(self, images, prompts):
        assert all(image.mode == "RGB" for image in images) and len(images) <= self.batch_size
        return torch.tensor([float(len(p)) for p in prompts], dtype=torch.float64)


def test_score_validates_batches_and_returns_float32_cpu():
    scorer = _Length(batch_size=2)
    images = [Image.new("L", (4, 4))] * 5
    out = scorer.score(images, ["a", "bb", "ccc", "dddd", "eeeee"])
    assert out.tolist() == [1, 2, 3, 4, 5] and out.dtype == torch.float32 and out.device.type == "cpu"
    assert scorer.score([], []).shape == (0,)
    with pytest.raises(SSPOError, match="2 images but 1 prompts"):
        scorer.score(images[:2], ["a"])
    with pytest.raises(SSPOError, match="image 0 is a ndarray"):
        import numpy as np

        scorer.score([np.zeros((4, 4, 3))], ["a"])
    with pytest.raises(SSPOError, match="batch_size"):
        _Length(batch_size=0)


def test_scoring_needs_no_autograd():
    class Grad(Scorer):
        def _score_batch(self, images, prompts):
            return torch.ones(len(images), requires_grad=True) * 2

    assert not Grad().score([Image.new("RGB", (2, 2))], ["x"]).requires_grad


def test_missing_files_and_hub_failures_are_model_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="no such file"):
        resolve_file(str(tmp_path / "nothing.pt"), "HPS_v2_compressed.pt", "HPS")
    with pytest.raises(ModelError, match="has no ImageReward.pt"):
        resolve_file(str(tmp_path), "ImageReward.pt", "ImageReward")
    assert resolve_file(str(tmp_path), "preprocessor_config.json", "CLIP", optional=True) is None

    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(pipeline, "hub_reachable", lambda: True)  # the hub answers, the download fails
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelError, match="cannot download ImageReward.pt from hub repo 'THUDM/ImageReward'.*local path"):
        build_scorer("imagereward")


def test_hub_model_load_failure_names_the_source(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(pipeline, "hub_reachable", lambda: True)  # the hub answers, the load fails
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", offline)
    with pytest.raises(ModelError, match="CLIP model from 'yuvalkirstain/PickScore_v1'"):
        build_scorer("pickscore")


def test_shapes_scorer_prefers_the_clean_render():
    pytest.importorskip("sspo.worlds.shapes.evaluator", reason="the shapes evaluator is not written yet")
    scorer = build_scorer("shapes", batch_size=4)
    spec = shapes.parse_prompt(PROMPTS[0])
    rng = random.Random(0)
    defects = ["blur", "noise", "wrong_color", "wrong_shape"]
    images = [shapes.render(spec)] + [shapes.render_defect(spec, rng, defect=d) for d in defects]
    scores = scorer.score(images, [PROMPTS[0]] * len(images))
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert scores.min() >= 0 and scores.max() <= 1
    assert (scores[0] > scores[1:]).all()
    with pytest.raises(SSPOError, match="no weights"):
        build_scorer("shapes", "some/model")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scorers_run_on_cuda_in_half_precision(
    tmp_path, monkeypatch, clip_model_dir, clip_processor_dir, hps_checkpoint, imagereward_dir, bert_tokenizer_dir,
    shape_images,
):
    from sspo.evaluation.scorers import hps
    from sspo.evaluation.scorers.clip import AESTHETIC_HEAD_FILE

    from scorer_models import EMBED, linear_mlp_state_dict

    monkeypatch.setattr(hps, "openclip_clean", str.strip)  # plain ASCII prompts; no ftfy needed
    torch.save(linear_mlp_state_dict(torch.Generator().manual_seed(0), EMBED), tmp_path / AESTHETIC_HEAD_FILE)
    builds = {
        "pickscore": (clip_model_dir, {"processor": str(clip_processor_dir)}),
        "hpsv2": (hps_checkpoint[0], {"processor": str(clip_processor_dir)}),
        "imagereward": (imagereward_dir, {"tokenizer": str(bert_tokenizer_dir)}),
        "aesthetic": (tmp_path, {"clip_model": str(clip_model_dir)}),
    }
    for name, (path, options) in builds.items():
        cpu = build_scorer(name, str(path), **options).score(shape_images, PROMPTS)
        gpu = build_scorer(name, str(path), device="cuda", dtype=torch.float16, **options).score(shape_images, PROMPTS)
        assert gpu.device.type == "cpu" and gpu.dtype == torch.float32, name
        assert torch.allclose(gpu, cpu, rtol=0.02, atol=0.05), (name, gpu, cpu)


def test_moving_shapes_scorer_prefers_the_clean_clip_and_gives_every_component():
    from sspo.worlds.moving_shapes import world as motion

    scorer = build_scorer("moving-shapes", batch_size=4)
    spec = motion.parse_motion_prompt("a small red circle moving from left to right, white background")
    rng = random.Random(0)
    clips = [motion.render_clip(spec)] + [motion.render_motion_defect(spec, rng, defect=d) for d in ("reversed", "static", "wrong_color")]
    scores = scorer.score(clips, [spec.prompt] * len(clips))
    assert (scores[0] > 0.9) and (scores[0] > scores[1:]).all()
    parts = scorer.score_parts(clips, [spec.prompt] * len(clips))
    assert {"", "direction", "amplitude", "color"} <= set(parts)
    assert parts["direction"][1] < parts["direction"][0]  # reversed: the direction is wrong


def test_a_reward_model_from_an_unreachable_hub_is_one_line_at_once(unreachable_hub, quick_base, tmp_path, capsys):
    import time

    from sspo.cli import main

    (tmp_path / "prompts.txt").write_text("a red circle\n")
    started = time.monotonic()
    argv = ["eval", "--model", quick_base, "--prompts", str(tmp_path / "prompts.txt"), "--metrics", "pickscore", "--steps", "2", "--seeds", "0",
            "--out", str(tmp_path / "eval")]
    assert main(argv) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sspo: error: metric 'pickscore': cannot load 'yuvalkirstain/PickScore_v1': the Hugging Face hub (http://127.0.0.1:9) "
                          "is unreachable;") and err.endswith("(pass local weights with --scorer-path pickscore=PATH; docs/scorers.md lists the files)")
    assert "gated" not in err  # the reward models are not: a note about licences is for diffusion models
