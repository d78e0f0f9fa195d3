"""`sspo sample`: the grid it writes, and what it refuses before any weights load."""

import pytest
from PIL import Image

from sspo.cli import main


@pytest.mark.parametrize("name, written, image_format", [("grid.png", "grid.png", "PNG"), ("grid.txt", "grid.png", "PNG"), ("grid", "grid.png", "PNG"),
                                                        ("grid.jpg", "grid.jpg", "JPEG"), ("grid.JPEG", "grid.JPEG", "JPEG"), ("grid.webp", "grid.webp", "WEBP")])
def test_sample_writes_a_grid_in_its_files_format_and_prints_its_path(name, written, image_format, quick_base, tmp_path, capsys):
    code = main(["sample", "--model", quick_base, "--prompt", "a large red circle on the left, white background",
                 "--prompt", "a small blue square at the top, black background", "--rows", "2", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / name)])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(tmp_path / written)
    assert "sampling: 100%" in captured.err and "2/2" in captured.err  # a bar while the rows are sampled
    assert sorted(path.name for path in tmp_path.iterdir()) == [written]
    grid = Image.open(tmp_path / written)
    assert grid.format == image_format and grid.width > 2 * 96 and grid.height > 2 * 96


def test_sample_takes_a_resolution_and_refuses_one_the_model_cannot_take(quick_base, tiny_sd3, tmp_path, monkeypatch, capsys):
    from sspo.evaluation import sampling

    sizes, generate = [], sampling.generate

    def recorded(pipe, prompts, seeds, **kwargs):
        sizes.append(kwargs["size"])
        return generate(pipe, prompts, seeds, **kwargs)

    monkeypatch.setattr(sampling, "generate", recorded)
    sample = ["sample", "--prompt", "a red circle", "--rows", "1", "--steps", "1", "--device", "cpu"]
    assert main([*sample, "--model", quick_base, "--resolution", "16", "--out", str(tmp_path / "small.png")]) == 0
    assert sizes == [16]
    assert main([*sample, "--model", quick_base, "--resolution", "36", "--out", str(tmp_path / "odd.png")]) == 2
    assert "sspo: error: --resolution: got 36, expected an integer in [8, 4096] that is a multiple of 8" in capsys.readouterr().err
    assert main([*sample, "--model", tiny_sd3, "--resolution", "72", "--out", str(tmp_path / "large.png")]) == 2
    assert "sspo: error: --resolution: sd3's position embedding covers image sides up to 64 px, not 72x72" in capsys.readouterr().err
    assert not (tmp_path / "large.png").exists()


def test_sample_puts_the_pipeline_on_the_accelerator_there_is(monkeypatch):
    import torch

    from sspo.evaluation.sampling import sampling_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert sampling_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert sampling_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sampling_device("auto") == torch.device("cuda") and sampling_device("cuda:1") == torch.device("cuda:1")
    assert sampling_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device, message", [
    ("gpu0", "--device: got 'gpu0', expected auto, cpu, cuda, cuda:N or mps"),
    ("cuda", "--device cuda: torch sees no such device here; use --device auto (or cpu)"),
])
def test_sample_refuses_a_device_before_loading_a_model(device, message, monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["sample", "--model", str(tmp_path / "no-model"), "--prompt", "a red circle", "--device", device, "--out", str(tmp_path / "grid.png")]) == 2
    assert capsys.readouterr().err.strip() == f"sspo: error: {message}"


@pytest.mark.parametrize("suffix, frames", [(".gif", 6), (".mp4", 6), (".png", 6), (".gif", 1)])
def test_sample_writes_an_animated_grid_for_a_video_model(suffix, frames, tmp_path):
    from sspo.video_io import read_clip
    from sspo.worlds.moving_shapes.base_model import vocabulary

    from tiny_pipelines import build_video_pipeline

    model = build_video_pipeline(tmp_path / "video", vocabulary(), max_frames=16)
    out = tmp_path / f"grid{suffix}"
    if suffix == ".png":  # a still grid's name, for a video model: a GIF beside it, the user's file kept
        out.write_bytes(b"the user's own image")
    argv = ["sample", "--model", str(model), "--prompt", "a red circle growing, white background", "--rows", "2", "--steps", "2", "--frames", str(frames)]
    assert main([*argv, "--out", str(out)]) == 0
    if suffix == ".png":
        assert out.read_bytes() == b"the user's own image"
        out = out.with_suffix(".gif")
    grid = read_clip(str(out))
    assert len(grid) == frames and grid.shape[1] > 2 * 96  # one grid per frame: captions, two seed rows


def test_sample_replaces_an_existing_file_only_with_force(quick_base, tmp_path, capsys):
    clip = tmp_path / "red.png"
    clip.write_bytes(b"the user's own image")
    argv = ["sample", "--model", quick_base, "--prompt", "a red circle", "--rows", "1", "--steps", "1", "--device", "cpu", "--out", str(clip)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"sspo: error: --out {clip} exists; pass --force to replace it, or name another file"
    assert clip.read_bytes() == b"the user's own image"
    assert main([*argv, "--force"]) == 0
    assert Image.open(clip).format == "PNG"


@pytest.mark.parametrize("home", [False, True])
def test_sample_refuses_an_existing_file_before_the_model_loads(home, quick_base, tmp_path, capsys, monkeypatch):
    from sspo.models import pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the weights loaded"))
    monkeypatch.setenv("HOME", str(tmp_path))  # a quoted ~/grid.png is the home folder's, as the shell's is
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"the user's own image")
    out = "~/grid.png" if home else str(grid)
    assert main(["sample", "--model", quick_base, "--prompt", "a red circle", "--device", "cpu", "--out", out]) == 2
    assert capsys.readouterr().err.strip() == f"sspo: error: --out {grid} exists; pass --force to replace it, or name another file"


def test_sample_refuses_an_existing_file_before_a_worlds_base_is_built(tmp_path, capsys, monkeypatch):
    from sspo.worlds import names

    monkeypatch.setattr(names, "resolve_model", lambda *a, **k: pytest.fail("the base was built"))
    grid = tmp_path / "grid.gif"  # grid.png named: a video world's base writes a GIF
    grid.write_bytes(b"the user's own clip")
    argv = ["sample", "--model", "moving-shapes-base:quick", "--prompt", "a red circle growing, white background", "--out", str(grid.with_suffix(".png"))]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"sspo: error: --out {grid} exists; pass --force to replace it, or name another file"


def test_a_grid_past_its_formats_longest_side_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    import sspo.models.pipeline

    monkeypatch.setattr(sspo.models.pipeline, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model for a grid it cannot write"))
    out = tmp_path / "big.webp"
    assert main(["sample", "--model", "shapes-base", "--prompt", "a red circle", "--rows", "171", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"sspo: error: --out {out}: a grid of 171 rows x 1 prompts is 186 x 16460 pixels, past the 16383 a side "
                                               "WEBP takes; name a .png, or give fewer --rows or --prompt")
    assert not out.exists()


def test_frames_for_an_image_model_are_refused_before_the_model_loads(quick_base, tmp_path, capsys, monkeypatch):
    from sspo.models import pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the weights loaded"))
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", quick_base, "--prompt", "a red circle", "--frames", "4", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"sspo: error: --frames 4: {quick_base} makes images, not clips; leave --frames out (it is for video models)"
    assert not out.exists()
