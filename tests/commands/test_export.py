"""``sspo export``: a tiny LoRA run's final model and pool checkpoints, converted to kohya's and diffusers'
layouts, load in a stock diffusers pipeline (a process that never imports sspo) and sample exactly
as the run's own LoRA and pool adapters do; full fine-tuning, an existing file and a failed hub
upload are one error line each, with nothing written."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sspo.cli import main
from sspo.commands import export as export_command
from sspo.commands.export import Lora, read_final, to_kohya
from sspo.errors import SSPOError
from sspo.training.pool import CheckpointPool
from sspo.training.trainer import train

from test_trainer import tiny_config

RANK, ALPHA = 4, 8  # alpha != rank: a file that dropped the scale would sample differently


@pytest.fixture(scope="module")
def lora_run(quick_base, tmp_path_factory) -> Path:
    """A tiny SSPO LoRA run (2 iterations of 2 steps): its pool holds checkpoints 0, 1 and 2 (the final policy)."""
    run = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(run, quick_base, f"model.lora_rank={RANK}", f"model.lora_alpha={ALPHA}"))
    return run


def export(capsys, run: Path, *flags: str) -> tuple[int, str]:
    """``sspo export RUN FLAGS``: its exit status, and its stdout or its one error line."""
    status = main(["export", str(run), *flags])
    captured = capsys.readouterr()
    if status == 0:
        return status, captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("sspo: error:")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return status, lines[0]


# The loading step: stock diffusers and peft only, in a process of its own. Each entry is a way to
# load a LoRA into a fresh pipeline; the script writes the sample latents of each.
STOCK_LOADING = r"""
import json, sys
import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

base, loads, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
latents = {}
absent = {name: None for name, value in json.load(open(f"{base}/model_index.json")).items() if value == [None, None]}
for name, (how, path) in loads.items():
    pipe = DiffusionPipeline.from_pretrained(base, **absent)
    pipe.set_progress_bar_config(disable=True)
    if how == "load_lora_weights":
        pipe.load_lora_weights(path)
    elif how == "peft":  # a pool checkpoint with the pool's adapter_config.json
        checkpoint = __import__("pathlib").Path(path)
        pipe.unet.add_adapter(LoraConfig.from_pretrained(str(checkpoint.parent)), adapter_name="checkpoint")
        assert not set_peft_model_state_dict(pipe.unet, load_file(str(checkpoint)), adapter_name="checkpoint").unexpected_keys
    with torch.no_grad():
        latents[name] = pipe("a small red circle on the left", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
assert not any(module == "sspo" or module.startswith("sspo.") for module in sys.modules)
save_file(latents, out)
"""


def stock_samples(base: str, loads: dict[str, tuple[str, Path | None]], tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / "latents.safetensors"
    loads = {name: (how, str(path) if path else None) for name, (how, path) in loads.items()}
    done = subprocess.run([sys.executable, "-c", STOCK_LOADING, base, json.dumps(loads), str(out)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return load_file(out)


def test_exports_sample_in_stock_diffusers_as_the_runs_own_lora_and_pool_adapters(lora_run, quick_base, tmp_path, capsys):
    files = {}
    for fmt, checkpoint in [("kohya", "final"), ("kohya", "1"), ("diffusers", "1")]:
        files[fmt, checkpoint] = tmp_path / f"{fmt}-{checkpoint}.safetensors"
        assert export(capsys, lora_run, "--format", fmt, "--checkpoint", checkpoint, "--out", str(files[fmt, checkpoint])) == (0, f"{files[fmt, checkpoint]}\n")
    kohya = load_file(files["kohya", "final"])
    assert kohya and all(key.startswith("lora_unet_") and key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in kohya)
    assert {value.item() for key, value in kohya.items() if key.endswith(".alpha")} == {ALPHA}
    from safetensors import safe_open

    with safe_open(files["kohya", "final"], "pt") as f:
        assert f.metadata() == {"ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA)}
    latents = stock_samples(quick_base, {
        "base": ("none", None),
        "final": ("load_lora_weights", lora_run / "final"),
        "final_kohya": ("load_lora_weights", files["kohya", "final"]),
        "pool_1": ("peft", lora_run / "pool" / "checkpoint-001.safetensors"),
        "pool_1_kohya": ("load_lora_weights", files["kohya", "1"]),
        "pool_1_diffusers": ("load_lora_weights", files["diffusers", "1"]),
    }, tmp_path)
    assert not torch.allclose(latents["base"], latents["final"], atol=1e-3)  # the LoRA changes the samples
    torch.testing.assert_close(latents["final_kohya"], latents["final"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(latents["pool_1"], latents["final"], atol=1e-3) and not torch.allclose(latents["pool_1"], latents["base"], atol=1e-3)
    torch.testing.assert_close(latents["pool_1_kohya"], latents["pool_1"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(latents["pool_1_diffusers"], latents["pool_1"], rtol=1e-4, atol=1e-5)


def test_the_pools_last_checkpoint_exports_as_the_final_lora(lora_run, tmp_path, capsys):
    """The pool's last entry is the final policy: each format gives the same tensors from either, and
    the diffusers export of the final LoRA is its file, byte for byte."""
    for fmt in ("kohya", "diffusers"):
        final, last = tmp_path / f"final-{fmt}.safetensors", tmp_path / f"last-{fmt}.safetensors"
        assert export(capsys, lora_run, "--format", fmt, "--out", str(final))[0] == 0
        assert export(capsys, lora_run, "--format", fmt, "--checkpoint", "2", "--out", str(last))[0] == 0
        a, b = load_file(final), load_file(last)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert (tmp_path / "final-diffusers.safetensors").read_bytes() == (lora_run / "final" / "pytorch_lora_weights.safetensors").read_bytes()


def test_a_pool_without_its_adapter_config_takes_the_final_loras(lora_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    (run / "pool" / "adapter_config.json").unlink()
    assert export(capsys, run, "--format", "kohya", "--checkpoint", "2", "--out", str(tmp_path / "a.safetensors"))[0] == 0
    assert export(capsys, lora_run, "--format", "kohya", "--checkpoint", "2", "--out", str(tmp_path / "b.safetensors"))[0] == 0
    assert load_file(tmp_path / "a.safetensors").keys() == load_file(tmp_path / "b.safetensors").keys()


def test_the_default_file_is_named_after_the_run_checkpoint_and_format(lora_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert export(capsys, lora_run, "--format", "kohya", "--checkpoint", "0") == (0, "run-checkpoint-000-kohya.safetensors\n")
    assert (tmp_path / "run-checkpoint-000-kohya.safetensors").is_file()


@pytest.fixture(scope="module")
def full_run(quick_base, tmp_path_factory) -> Path:
    """A one-step SFT run that fine-tunes the whole UNet."""
    run = tmp_path_factory.mktemp("export-full") / "run"
    train(tiny_config(run, quick_base, "method=sft", "model.lora=false", "iterations=1", "steps_per_iteration=1"))
    return run


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_a_full_fine_tuning_run_is_refused_with_where_its_model_is(fmt, full_run, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    status, line = export(capsys, full_run, "--format", fmt, "--out", str(out))
    assert status == 2 and "export is for LoRA runs" in line and f"the full model is the diffusers folder {full_run / 'final'}" in line
    assert not out.exists()


def test_a_transformer_lora_exports_for_load_lora_weights_and_kohyas_layout_is_refused(tiny_sd3, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "lora.safetensors"
    train(tiny_config(run, tiny_sd3, "negatives.scheduler=pipeline", "model.lora_targets=[to_q]", "iterations=1", "steps_per_iteration=1"))
    refusal = f"sspo: error: {run} trained a LoRA of the transformer: kohya's layout is for UNet LoRAs (SD-1.5, SDXL, AnimateDiff); " \
              "export --format diffusers, the layout of the run's final/ (the file load_lora_weights reads)"
    assert export(capsys, run, "--format", "kohya", "--out", str(out)) == (2, refusal)
    assert not out.exists()
    final, first, initial = (tmp_path / f"{name}.safetensors" for name in ("final", "first", "initial"))
    for checkpoint, file in (("final", final), ("1", first), ("0", initial)):
        assert export(capsys, run, "--format", "diffusers", "--checkpoint", checkpoint, "--out", str(file)) == (0, f"{file}\n")
    assert final.read_bytes() == (run / "final" / "pytorch_lora_weights.safetensors").read_bytes()
    a, b = load_file(final), load_file(first)  # the pool's last checkpoint is the final LoRA
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    latents = stock_samples(tiny_sd3, {"final": ("load_lora_weights", final), "first": ("load_lora_weights", first),
                                       "initial": ("load_lora_weights", initial), "base": ("none", None)}, tmp_path)
    torch.testing.assert_close(latents["first"], latents["final"])
    torch.testing.assert_close(latents["initial"], latents["base"])  # theta_0's LoRA is zero
    assert not torch.allclose(latents["final"], latents["base"], atol=1e-4)
    code = (run / "final" / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]  # the model card's, as written
    assert "text_encoder_3=None, tokenizer_3=None" in code and "background" in code  # a prompt of the run's own
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and (tmp_path / "sample.png").is_file(), done.stderr[-3000:]
    shutil.rmtree(run / "final")  # a run stopped before its end: the pool's index says what it adapts
    (run / "pool" / "pool.json").unlink()  # an index rebuilt from the files does not say: the run's model does
    assert export(capsys, run, "--format", "kohya", "--checkpoint", "1", "--out", str(out)) == (2, refusal)
    assert export(capsys, run, "--format", "diffusers", "--checkpoint", "1", "--out", str(out)) == (0, f"{out}\n")
    assert load_file(out).keys() == a.keys()


def test_a_video_run_without_lora_names_its_motion_modules(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "final" / "motion_adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  lora: false\n")
    status, line = export(capsys, run, "--format", "diffusers")
    assert status == 2 and line.endswith(f"(its trained motion modules alone: {run / 'final' / 'motion_adapter'}, which MotionAdapter.from_pretrained loads)")


def test_an_existing_file_is_kept_unless_forced(lora_run, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"someone's file")
    status, line = export(capsys, lora_run, "--format", "kohya", "--out", str(out))
    assert status == 2 and line == f"sspo: error: {out} exists; pass --force to replace it, or choose another --out"
    assert out.read_bytes() == b"someone's file" and [p.name for p in tmp_path.iterdir()] == [out.name]
    assert export(capsys, lora_run, "--format", "kohya", "--out", str(out), "--force")[0] == 0
    assert load_file(out).keys() == to_kohya(read_final(lora_run)).keys()


@pytest.mark.parametrize("name", ["lora.ckpt", "lora.pt", "lora"])
def test_an_out_name_that_is_not_safetensors_is_refused(name, lora_run, tmp_path, capsys):
    out = tmp_path / name
    status, line = export(capsys, lora_run, "--format", "kohya", "--out", str(out))
    assert status == 2 and line == f"sspo: error: --out {out}: export writes a safetensors file; name it lora.safetensors"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free disk space or choose another --out"), (errno.ENOENT, "choose another --out")])
def test_a_failed_write_names_the_fix_for_its_cause(code, fix, lora_run, tmp_path, capsys, monkeypatch):
    def failing(tensors, path, metadata=None):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(export_command, "save_tensors", failing)
    out = tmp_path / "lora.safetensors"
    status, line = export(capsys, lora_run, "--format", "kohya", "--out", str(out))
    assert status == 2 and line == f"sspo: error: cannot write {out}: {os.strerror(code)}; {fix}"
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_a_full_disk_as_safetensors_reports_it_is_one_line(fmt, lora_run, tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "lora.safetensors"
    status, line = export(capsys, lora_run, "--format", fmt, "--out", str(out))
    assert status == 2 and line == f"sspo: error: cannot write {out}: No space left on device; free disk space or choose another --out"
    assert list(tmp_path.iterdir()) == []


def test_a_released_pool_checkpoint_is_one_error_line(lora_run, tmp_path, capsys):
    """Under erd initial or last a run releases what it never draws again (sspo/training/pool.py)."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    CheckpointPool(run / "pool").release({"checkpoint-000.safetensors", "checkpoint-002.safetensors"})
    assert export(capsys, run, "--format", "kohya", "--checkpoint", "1") == (
        2, f"sspo: error: --checkpoint 1: the pool of {run} released it (its erd never draws it again); export one it keeps (0, 2) "
           "or the final model (--checkpoint final)")
    assert export(capsys, run, "--format", "kohya", "--checkpoint", "2", "--out", str(tmp_path / "kept.safetensors"))[0] == 0


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint", "3"], "--checkpoint 3: the pool of {run} holds checkpoints 0 to 2 (after steps 0, 2, 4)"),
    (["--checkpoint", "last"], "--checkpoint 'last': expected final or the number of a pool checkpoint"),
    (["--out", "{tmp}"], "--out {tmp} is a folder; name the file to write"),
])
def test_bad_flags_are_one_error_line(flags, message, lora_run, tmp_path, capsys):
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    status, line = export(capsys, lora_run, "--format", "kohya", *flags)
    assert status == 2 and message.format(run=lora_run, tmp=tmp_path) in line and not list(tmp_path.iterdir())


def test_runs_without_what_is_asked_for_are_named(lora_run, tmp_path, capsys):
    status, line = export(capsys, tmp_path, "--format", "kohya")
    assert status == 2 and "is not a training run's folder (no config.yaml there)" in line
    status, line = export(capsys, lora_run / "final", "--format", "kohya")  # the run's final/ given for the run
    assert status == 2 and line.endswith(f"pass the output_dir that sspo train wrote ({lora_run}, it seems)")
    status, line = export(capsys, tmp_path / "nothere", "--format", "kohya")
    assert status == 2 and line == f"sspo: error: {tmp_path / 'nothere'} does not exist; pass the output_dir that sspo train wrote"
    for text in ("cfg\n", "method: sft\n"):  # a folder of the user's own with a config.yaml: no run to finish
        (tmp_path / "mine").mkdir(exist_ok=True)
        (tmp_path / "mine" / "config.yaml").write_text(text)
        (tmp_path / "mine" / "notes.txt").write_text("mine\n")
        status, line = export(capsys, tmp_path / "mine", "--format", "kohya")
        assert status == 2 and line == (f"sspo: error: {tmp_path / 'mine'} is not a training run's folder (its config.yaml and files are not what "
                                        "sspo train writes); pass the output_dir that sspo train wrote")
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    (run / "pool" / "checkpoint-002.safetensors").unlink()
    status, line = export(capsys, run, "--format", "kohya", "--checkpoint", "2")
    assert status == 2 and line.endswith("; restore it from a copy, or export the run's final model (--checkpoint final)")
    shutil.rmtree(run / "pool")
    status, line = export(capsys, run, "--format", "kohya", "--checkpoint", "1")
    assert status == 2 and "keeps no checkpoint pool" in line
    shutil.rmtree(run / "final")
    status, line = export(capsys, run, "--format", "kohya")
    assert status == 2 and "has no final LoRA" in line and "sspo train CONFIG --resume" in line


def test_a_layer_kohyas_reader_cannot_name_is_refused():
    """The tiny UNet's pooled-text embedding (add_embedding.pool.k_proj, ...) is no SD or SDXL layer:
    diffusers' kohya reader turns its underscores into dots and never back."""
    generator = torch.Generator().manual_seed(0)
    layers = {"add_embedding.pool.k_proj.lora_A.weight": torch.randn(RANK, 16, generator=generator),
              "add_embedding.pool.k_proj.lora_B.weight": torch.randn(16, RANK, generator=generator)}
    with pytest.raises(SSPOError, match=r"cannot carry 1 layer of this LoRA \(e.g. add_embedding.pool.k_proj\).*--format diffusers"):
        to_kohya(Lora(layers, {"lora_alpha": ALPHA}, "final", "unet"))


class StubHub:
    """huggingface_hub.HfApi as far as the export uses it; ``fail`` makes every call raise it."""

    calls: list = []
    fail: Exception | None = None

    def create_repo(self, repo_id, **kwargs):
        self._call("create_repo", repo_id=repo_id, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_file(self, **kwargs):
        self._call("upload_file", **kwargs, content=Path(kwargs["path_or_fileobj"]).read_bytes())

    def _call(self, name, **kwargs):
        if StubHub.fail is not None:
            raise StubHub.fail
        StubHub.calls.append((name, kwargs))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", StubHub)
    StubHub.calls, StubHub.fail = [], None
    return StubHub


def test_push_to_hub_uploads_the_file(hub, lora_run, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    assert export(capsys, lora_run, "--format", "kohya", "--out", str(out), "--push-to-hub", "someone/sspo-lora") == (0, f"{out}\nhttps://huggingface.co/someone/sspo-lora\n")
    (create, created), (upload, uploaded) = hub.calls
    assert (create, created) == ("create_repo", {"repo_id": "someone/sspo-lora", "exist_ok": True})
    assert upload == "upload_file" and uploaded["repo_id"] == "someone/sspo-lora" and uploaded["path_in_repo"] == out.name
    assert uploaded["content"] == out.read_bytes()


def test_a_failed_upload_is_one_error_line_and_keeps_the_file(hub, lora_run, tmp_path, capsys):
    hub.fail = ConnectionError("could not reach huggingface.co\nretrying...")
    out = tmp_path / "lora.safetensors"
    status, line = export(capsys, lora_run, "--format", "kohya", "--out", str(out), "--push-to-hub", "someone/sspo-lora")
    assert status == 2 and line.startswith("sspo: error: --push-to-hub someone/sspo-lora: the upload failed (could not reach huggingface.co);")
    assert f"{out} is written" in line and load_file(out)
    hub.fail = None  # the fix the line gives works: the same command with --force
    assert export(capsys, lora_run, "--format", "kohya", "--out", str(out), "--push-to-hub", "someone/sspo-lora", "--force")[0] == 0


def test_a_bad_repo_id_is_refused_before_the_file_is_written(hub, lora_run, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    status, line = export(capsys, lora_run, "--format", "kohya", "--out", str(out), "--push-to-hub", "my lora")
    assert status == 2 and line.startswith("sspo: error: --push-to-hub 'my lora' is not a hub repository id")
    assert not out.exists() and not hub.calls


def test_a_pool_checkpoint_file_is_unchanged_by_its_adapter_config(lora_run):
    """The adapter config is one file beside the checkpoints; each checkpoint stays peft's state dict alone."""
    config = json.loads((lora_run / "pool" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and config["target_modules"] == sorted(config["target_modules"])
    checkpoint = load_file(lora_run / "pool" / "checkpoint-001.safetensors")
    assert checkpoint and all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in checkpoint)


def test_sspo_samples_with_its_own_kohya_export_as_with_the_runs_lora(lora_run, quick_base, tmp_path, capsys):
    from PIL import Image

    kohya = tmp_path / "final-kohya.safetensors"
    assert export(capsys, lora_run, "--format", "kohya", "--out", str(kohya))[0] == 0
    grids = {}
    for name, lora in (("kohya", kohya), ("run", lora_run / "final")):
        argv = ["sample", "--model", quick_base, "--lora", str(lora), "--prompt", "a small red circle on the left", "--rows", "1", "--steps", "2",
                "--device", "cpu", "--out", str(tmp_path / f"{name}.png")]
        assert main(argv) == 0, capsys.readouterr().err
        grids[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    assert np.abs(grids["kohya"] - grids["run"]).max() <= 2  # the same LoRA, up to float rounding of its conversion
