"""The paper's video metrics (FID, PSNR, FVD, MTScore, CHScore) against reference computations and
hand-computed values, with tiny TorchScript stand-ins of the published backbones built offline,
and ``sspo eval --videos`` end to end."""

import json
import math
import re

import numpy as np
import pytest
import torch

from sspo.cli import main
from sspo.commands.eval_videos import find_clips
from sspo.errors import SSPOError
from sspo.evaluation.video_metrics import (
    FD_OFFSET,
    MTSCORE_CANDIDATES,
    PSNR_MAX,
    build_video_metric,
    check_options,
    chscore,
    coherence_score,
    fid_features,
    frechet_distance,
    frechet_distance_from_stats,
    metamorphic_score,
    mtscore,
    pixel_features,
    psnr,
    resample_frames,
)
from sspo.video_io import write_clip

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


def scipy_frechet(a, b, offset=0.0):
    """pytorch-fid's formula: scipy's general sqrtm of the (offset) covariance product."""
    linalg = pytest.importorskip("scipy.linalg")
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eye = offset * np.eye(len(s_a))
    root = linalg.sqrtm((s_a + eye) @ (s_b + eye)).real
    return float((mu_a - mu_b) @ (mu_a - mu_b) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root))


def correlated(rng, n, d, shift=0.0):
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift


def test_frechet_distance_matches_the_scipy_reference():
    rng = np.random.default_rng(0)
    a, b = correlated(rng, 60, 6), correlated(rng, 50, 6, shift=0.5)
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a, b), rel=1e-9)


def test_a_singular_product_gets_pytorch_fids_diagonal_offset():
    rng = np.random.default_rng(1)
    a, b = correlated(rng, 5, 12), correlated(rng, 7, 12, shift=0.3)  # fewer samples than dimensions
    expected = scipy_frechet(a, b, offset=FD_OFFSET)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-6)
    assert abs(expected - scipy_frechet(a, b)) > 1e-3  # without the offset: ~0.01 more here, so the test tells them apart


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    # |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 = (1 + 0 + 4) + (1 + 0 + 4)
    assert frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(10.0, abs=1e-12)


def test_identical_sets_are_at_distance_zero_and_a_shifted_set_at_the_squared_shift():
    a = correlated(np.random.default_rng(2), 40, 5)
    shift = np.array([0.5, -1.0, 0.0, 2.0, 0.0])
    assert abs(frechet_distance(a, a)) < 1e-9
    assert frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-9)
    with pytest.raises(SSPOError, match="at least 2"):
        frechet_distance(a[:1], a)


def test_resample_frames_repeats_short_clips_and_subsamples_long_ones():
    assert resample_frames(np.arange(8), 16).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert resample_frames(np.arange(20), 4).tolist() == [0, 5, 10, 15]


def test_psnr_by_hand():
    clip = np.zeros((2, 4, 4, 3), np.uint8)
    reference = clip.copy()
    reference[1] = 10  # frame 1: MSE 100 -> 10 log10(255^2 / 100) dB; frame 0 identical -> the cap
    expected = (PSNR_MAX + 10 * math.log10(255**2 / 100)) / 2
    assert psnr(clip, reference) == pytest.approx(expected, abs=1e-9)
    assert 10 * math.log10(255**2 / 100) == pytest.approx(28.1308, abs=1e-4)


def test_psnr_brings_the_reference_to_the_clips_frames_and_size():
    clip = np.full((8, 4, 4, 3), 20, np.uint8)
    reference = np.full((4, 16, 16, 3), 20, np.uint8)
    reference[3] = 30  # after resampling 4 -> 8 frames, frames 6 and 7 show it: MSE 100 there
    assert psnr(clip, reference) == pytest.approx((6 * PSNR_MAX + 2 * 10 * math.log10(255**2 / 100)) / 8, abs=1e-9)


def test_metamorphic_score_by_hand():
    text = torch.eye(10)  # caption k's embedding: axis k, so the cosine with caption k is video[k] / |video|
    video = torch.tensor([0.010, 0.001, 0.009, 0.002, 0.003, 0.008, 0.004, 0.007, 0.005, 0.006])
    norm = math.sqrt(sum(v * v for v in video.tolist()))
    weights = [math.exp(100 * v / norm) for v in video.tolist()]
    # the five most probable: captions 0, 2, 5, 7, 9; of those, 5, 7 and 9 are time-lapse captions
    assert metamorphic_score(video, text) == pytest.approx((weights[5] + weights[7] + weights[9]) / sum(weights), rel=1e-9)
    assert metamorphic_score(text[8] * 3, text) == pytest.approx(1 / (1 + 9 * math.exp(-100)), rel=1e-12)
    assert metamorphic_score(text[1], text) == pytest.approx(0.0, abs=1e-40)
    with pytest.raises(SSPOError, match=r"\[10, 5\]"):
        metamorphic_score(torch.ones(5), torch.ones(9, 5))


def test_mtscore_samples_frames_resizes_and_normalises_as_chronomagic():
    clip = np.zeros((9, 8, 8, 3), np.uint8)
    for t in range(9):
        clip[t] = 10 * t
    seen = {}

    def encoder(x):
        seen["x"] = x
        return torch.ones(1, 10)

    mtscore(clip, encoder, torch.eye(10))
    x = seen["x"]
    assert x.shape == (1, 4, 3, 224, 224)  # 4 frames every 9 // 4 = 2: frames 0, 2, 4, 6
    red = (x[0, :, 0, 0, 0] * 0.229 + 0.485) * 255
    assert red.tolist() == pytest.approx([0, 20, 40, 60], abs=1e-4)
    with pytest.raises(SSPOError, match="fewer than frames=4"):
        mtscore(clip[:3], encoder, torch.eye(10))


def test_coherence_score_by_hand():
    visible = torch.ones(4, 10, dtype=torch.bool)
    visible[2:, :2] = False  # missing fraction per frame: 0, 0, 0.2, 0.2; changes 0, 0.2, 0
    ampr, mpvr, cuts = 0.1, math.sqrt(((0 - 0.2 / 3) ** 2 * 2 + (0.2 - 0.2 / 3) ** 2) / 2), 1
    total = (0.35 * ampr / 0.9368749856948853 + 0.25 * mpvr / 0.8997353911399841 + 0.15 * (cuts / 4) / 0.625
             + 0.15 * cuts / 20 + 0.10 * 0.2 / 1.0)
    assert coherence_score(visible) == pytest.approx(1 / total, rel=1e-6)
    assert coherence_score(torch.ones(5, 10)) == 0.0  # the published quirk: nothing ever lost -> a sum of 0 -> 0
    with pytest.raises(SSPOError, match="at least 3 frames"):
        coherence_score(visible[:2])
    assert chscore(np.zeros((4, 2, 2, 3), np.uint8), lambda video: visible[None]) == coherence_score(visible)


# --- TorchScript stand-ins of the published backbones, with their calling conventions ---------


class TinyInception(torch.nn.Module):
    """StyleGAN2-ADA's Inception convention: uint8 [N, 3, H, W] in, ``return_features=True``."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3 and return_features
        x = x.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


class TinyI3D(torch.nn.Module):
    """StyleGAN-V's I3D convention: [B, 3, T, 224, 224] on [-1, 1], at least 9 frames."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> torch.Tensor:
        assert x.dim() == 5 and x.shape[1] == 3 and x.shape[2] >= 9 and x.shape[3] == 224 and x.shape[4] == 224
        assert not rescale and not resize and return_features and bool(x.min() >= -1) and bool(x.max() <= 1)
        motion = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(2, 3, 4))
        return torch.cat([x.mean(dim=(2, 3, 4)), motion], dim=1)


class TinyVideoText(torch.nn.Module):
    """A video encoder whose embedding points at the time-lapse captions as much as its frames change."""

    def __init__(self):
        super().__init__()
        self.register_buffer("text_features", torch.eye(10))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        change = (video[:, -1] - video[:, 0]).abs().mean(dim=(1, 2, 3))
        return torch.cat([torch.full((video.shape[0], 5), 0.05), change[:, None].expand(-1, 5)], dim=1)


class TinyTracker(torch.nn.Module):
    """CoTracker's call: a grid_size x grid_size grid of points from frame 0; a point is visible
    while its pixel keeps frame 0's colour. Returns (tracks, visibility [1, T, N])."""

    def forward(self, video: torch.Tensor, grid_size: int = 0):
        h, w = video.shape[-2], video.shape[-1]
        ys = torch.linspace(0, h - 1, grid_size).round().long().repeat_interleave(grid_size)
        xs = torch.linspace(0, w - 1, grid_size).round().long().repeat(grid_size)
        colours = video[0][:, :, ys, xs]  # [T, 3, N]
        visible = (colours - colours[:1]).abs().sum(dim=1) < 30
        tracks = torch.stack([xs, ys], dim=-1).float().expand(video.shape[1], -1, -1)
        return tracks[None], visible[None]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backbones")
    paths = {}
    for name, module in (("fid", TinyInception()), ("fvd", TinyI3D()), ("mtscore", TinyVideoText()), ("chscore", TinyTracker())):
        paths[name] = str(folder / f"{name}.pt")
        torch.jit.save(torch.jit.script(module), paths[name])
    return paths


def time_lapse(background, start, end, frames=8, size=16, grow=0):
    """A square turning from colour ``start`` to ``end`` (and growing by ``grow`` px a frame) on ``background``."""
    clip = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        a = t / (frames - 1)
        clip[t] = background
        half = 2 + grow * t // 2
        c = size // 2
        clip[t, c - half : c + half, c - half : c + half] = np.round((1 - a) * np.array(start) + a * np.array(end))
    return clip


CLIPS = [time_lapse((255, 255, 255), (200, 0, 0), (0, 200, 0)), time_lapse((0, 0, 0), (0, 0, 200), (0, 0, 200), grow=1),
         time_lapse((255, 255, 255), (0, 0, 200), (200, 200, 0)), time_lapse((0, 0, 0), (200, 0, 0), (200, 0, 0), grow=1)]


def shifted(clip, by=40):
    return np.clip(clip.astype(int) + by, 0, 255).astype(np.uint8)


def test_torchscript_backbones_are_called_with_the_published_conventions(backbones):
    fvd = build_video_metric("fvd", backbones["fvd"])
    same = np.concatenate([fvd(c) for c in CLIPS])
    assert same.shape == (4, 6)
    assert abs(frechet_distance(same, same)) < 1e-4
    assert frechet_distance(same, np.concatenate([fvd(shifted(c)) for c in CLIPS])) > 0.01
    with pytest.raises(SSPOError, match="at least 9 frames"):
        build_video_metric("fvd", backbones["fvd"], frames=8)(CLIPS[0])

    fid = build_video_metric("fid", backbones["fid"], batch_size=3)
    assert fid(CLIPS[0]).shape == (8, 6)
    np.testing.assert_allclose(fid(CLIPS[0]), fid_features(CLIPS[0], lambda x: TinyInception()(x, return_features=True)))

    mt = build_video_metric("mtscore", backbones["mtscore"])
    static = np.repeat(CLIPS[0][:1], 8, axis=0)
    assert mt(static) < 0.01 < 0.99 < mt(CLIPS[0])  # no change: "a normal video"; a colour turning: "a time-lapse video"
    assert len(MTSCORE_CANDIDATES) == 10

    ch = build_video_metric("chscore", backbones["chscore"], grid_size=8)
    assert ch(static) == 0.0 and ch(CLIPS[1]) > 0  # the grown square covers points of the background
    assert build_video_metric("chscore", TinyTracker(), grid_size=8)(CLIPS[1]) == ch(CLIPS[1])  # a module passed in, not a file
    with pytest.raises(SSPOError, match="no option 'grid'; its options: threshold, grid_size"):
        build_video_metric("chscore", backbones["chscore"], grid=8)


def test_fid_pixel_features_are_exact_cell_means():
    frames = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    frames[0, 0, :2, :2] = 255  # the top-left cell of red, 2 x 2 pixels: fully red
    features = pixel_features(frames)
    assert features.shape == (1, 192) and features[0, 0] == 1.0 and features[0].sum() == 1.0
    fid = build_video_metric("fid", "pixels")
    gen, ref = np.concatenate([fid(c) for c in CLIPS]), np.concatenate([fid(shifted(c)) for c in CLIPS])
    assert abs(frechet_distance(gen, gen)) < 1e-3 and frechet_distance(gen, ref) > 1.0


def test_a_missing_backbone_file_is_one_error_naming_it(tmp_path):
    with pytest.raises(SSPOError, match=re.escape(f"metric 'fvd': no such file: {tmp_path}/i3d.pt")):
        build_video_metric("fvd", str(tmp_path / "i3d.pt"))
    (tmp_path / "state.pt").write_bytes(b"not a zip archive")
    with pytest.raises(SSPOError, match="is not a TorchScript file"):
        build_video_metric("fid", str(tmp_path / "state.pt"))


# --- sspo eval --videos -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """Prompts in two categories; reference clips; model "same" = the references, model "shifted" brighter."""
    root = tmp_path_factory.mktemp("clips")
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps({"turn": ["a red square turning green", "a blue square turning yellow"],
                                   "grow": ["a blue square growing", "a red square growing"]}))
    order = [0, 2, 1, 3]  # the file's prompt order: turn, turn, grow, grow
    for name, change in (("reference", None), ("same", lambda c: c), ("shifted", shifted)):
        for index, k in enumerate(order):
            if change is None:
                write_clip(root / name / f"{index}.tiff", CLIPS[k])
            else:
                for seed in (0, 1):
                    write_clip(root / name / f"{index}-{seed}.{'webp' if seed else 'tiff'}", change(CLIPS[k]))  # both lossless
    return root


def eval_args(root, backbones, out, *extra):
    return ["eval", "--videos", str(root / "same"), "--videos", str(root / "shifted"), "--name", "same", "--name", "shifted",
            "--reference-videos", str(root / "reference"), "--prompts", str(root / "prompts.json"), "--seeds", "0,1", "--out", str(out),
            "--scorer-path", "fid=pixels", "--scorer-path", f"fvd={backbones['fvd']}", "--scorer-path", f"mtscore={backbones['mtscore']}",
            "--scorer-path", f"chscore={backbones['chscore']}", "--scorer-option", "chscore.grid_size=8",
            "--scorer-option", "fid.bootstrap=20", "--scorer-option", "fvd.bootstrap=20", *extra]


def test_eval_videos_writes_the_table_with_intervals(clip_folders, backbones, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(eval_args(clip_folders, backbones, out)) == 0
    table = capsys.readouterr().out
    assert "| model | fid ↓ | psnr ↑ | fvd ↓ | mtscore ↑ | chscore ↑ |" in table and "## turn (2 prompts)" in table
    summary = json.loads((out / "video_summary.json").read_text())
    same, moved = summary["results"]["same"]["all"], summary["results"]["shifted"]["all"]
    assert same["psnr"]["mean"] == PSNR_MAX and same["psnr"]["ci95_low"] == PSNR_MAX  # identical clips, every prompt
    assert moved["psnr"]["mean"] < 30 and moved["psnr"]["ci95_low"] < moved["psnr"]["mean"]  # 40 levels brighter (less where clipped at 255)
    for metric in ("fid", "fvd"):
        assert same[metric]["mean"] < moved[metric]["mean"] and same[metric]["n"] == 4
        assert moved[metric]["ci95_low"] <= moved[metric]["ci95_high"]
    assert summary["results"]["same"]["grow"]["chscore"]["mean"] > 0
    assert same["mtscore"]["mean"] > 0.9  # every clip changes
    assert (out / "video_scores.csv").read_text().count("\n") == 1 + 2 * 4 * 2 and (out / "video_hist.png").is_file()


def test_clips_sspo_eval_made_for_other_prompts_are_refused(clip_folders, backbones, tmp_path, capsys):
    import shutil

    same = tmp_path / "same"
    shutil.copytree(clip_folders / "same", same)
    prompts = ["a red square turning green", "a blue square turning yellow", "a blue square growing", "a red square growing"]
    argv = ["eval", "--videos", str(same), "--prompts", str(clip_folders / "prompts.json"), "--seeds", "0", "--metrics", "mtscore",
            "--scorer-path", f"mtscore={backbones['mtscore']}"]
    (same / "manifest.json").write_text(json.dumps({"settings": {}, "prompts": dict(enumerate(prompts))}))
    assert main([*argv, "--out", str(tmp_path / "right")]) == 0
    capsys.readouterr()
    (same / "manifest.json").write_text(json.dumps({"settings": {}, "prompts": {"0": prompts[0], "1": "a small orange circle moving down"}}))
    assert main([*argv, "--out", str(tmp_path / "wrong")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"sspo: error: {same}: clip 1 was generated for 'a small orange circle moving down', not 'a blue square turning yellow'; "
                    "pass the --prompts and --prompts-per-split (or --limit) the clips were made with")
    assert not (tmp_path / "wrong").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scorer-path", "fvd={tmp}/i3d.pt"], "metric 'fvd': no such file: {tmp}/i3d.pt (set --scorer-path fvd=PATH)"),
        (["--metrics", "fvd", "--scorer-path", "fvd="], "--scorer-path takes METRIC=PATH"),
        (["--metrics", "pickscore"], "unknown video metric 'pickscore'"),
        (["--scorer-option", "psnr.frames=3", "--metrics", "psnr"], "metric 'psnr' has no option 'frames'"),
        (["--scorer-option", "fid.frames=abc"], "metric 'fid' option 'frames': got 'abc', expected an integer > 0"),
        (["--scorer-option", "fvd.frames=0"], "metric 'fvd' option 'frames': got 0, expected an integer > 0"),
        (["--scorer-option", "chscore.grid_size=2.5"], "metric 'chscore' option 'grid_size': got 2.5, expected an integer > 0"),
        (["--scorer-option", "chscore.threshold=-1"], "metric 'chscore' option 'threshold': got -1, expected a number >= 0"),
        (["--scorer-option", "fid.bootstrap=many"], "metric 'fid' option 'bootstrap': got 'many', expected an integer >= 0"),
        (["--seeds", "0,7"], "lacks 4 of the 8 clips the prompts and seeds ask for: 0-7, 1-7, 2-7, 3-7"),
    ],
)
def test_bad_video_eval_input_is_one_clear_error(extra, message, clip_folders, backbones, tmp_path, capsys):
    argv = eval_args(clip_folders, backbones, tmp_path / "out", *[a.format(tmp=tmp_path) for a in extra])
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sspo: error:")]
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0] and "Traceback" not in err


def test_null_is_an_options_default_where_the_option_has_one():
    from sspo.commands.eval import parse_scorer_options

    options = parse_scorer_options({"frames": "null", "bootstrap": "200", "processor": "/m/proc"})
    assert options == {"frames": None, "bootstrap": 200, "processor": "/m/proc"}
    check_options("fid", {"frames": None})  # every frame: fid_features' default
    with pytest.raises(SSPOError, match="metric 'fvd' option 'frames': got None, expected an integer > 0"):
        check_options("fvd", {"frames": None})


def test_clip_folders_must_hold_clips_and_references_must_be_given(clip_folders, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no clips here")
    base = ["eval", "--prompts", str(clip_folders / "prompts.json"), "--out", str(tmp_path / "out")]
    assert main([*base, "--videos", str(tmp_path / "empty"), "--metrics", "mtscore", "--scorer-path", "mtscore=x.pt"]) == 2
    assert "metric 'mtscore': no such file: x.pt" in capsys.readouterr().err
    assert main([*base, "--videos", str(tmp_path / "empty"), "--metrics", "psnr", "--reference-videos", str(clip_folders / "reference")]) == 2
    assert f"no clips in {tmp_path / 'empty'}: expected files named like 0-0.tiff" in capsys.readouterr().err
    assert main([*base, "--videos", str(clip_folders / "same"), "--metrics", "psnr"]) == 2
    assert "psnr needs reference clips: pass --reference-videos DIR" in capsys.readouterr().err
    assert main([*base, "--videos", str(clip_folders / "same"), "--metrics", "fvd"]) == 2
    assert "metric 'fvd' needs the I3D TorchScript file" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path / "out")]) == 2
    assert "pass --model (generate images and score them) or --videos DIR" in capsys.readouterr().err
    write_clip(tmp_path / "empty" / "0-0.tiff", CLIPS[0])
    write_clip(tmp_path / "empty" / "0-0.gif", CLIPS[0])
    with pytest.raises(SSPOError, match="two clips for the same name: 0-0.gif and 0-0.tiff"):
        find_clips(tmp_path / "empty")


def test_a_file_that_is_not_torchscript_is_named_in_one_sentence(tmp_path):
    from sspo.errors import ModelError
    from sspo.evaluation.video_metrics import load_torchscript

    (tmp_path / "prompts.txt").write_text("a red circle\n")
    with pytest.raises(ModelError) as caught:
        load_torchscript(tmp_path / "prompts.txt", "metric 'fid'")
    assert str(caught.value) == f"metric 'fid': {tmp_path / 'prompts.txt'} is not a TorchScript file (PytorchStreamReader failed reading zip archive: not a ZIP archive)"


def test_a_clip_a_metric_cannot_measure_is_named(clip_folders, backbones, tmp_path, capsys):
    argv = eval_args(clip_folders, backbones, tmp_path / "out", "--metrics", "mtscore", "--scorer-option", "mtscore.frames=100")
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sspo: error:")]
    assert lines == [f"sspo: error: clip {clip_folders / 'same' / '0-0.tiff'}: mtscore: a clip of {len(CLIPS[0])} frames, fewer than frames=100"]
