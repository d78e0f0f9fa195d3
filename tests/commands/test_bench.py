"""``sspo bench``: every arm runs, the table and ratios come out, and the SD architectures are the real ones."""

import json
import math

import pytest
import torch

from sspo.benchmark.config import ARMS, BenchConfig
from sspo.benchmark.report import format_table
from sspo.cli import main
from sspo.commands.bench import run_bench
from sspo.errors import SSPOError
from sspo.models.architectures import arch_components, build_arch

# The quick base at seconds per arm: batch 4, 2 steps per iteration, 2 sampler steps.
QUICK = ("optim.batch_size=4", "negatives.steps=2", "negatives.batch_size=8", "data.world_pairs_per_prompt=1", "data.max_samples=64")


def quick_bench(**kwargs) -> BenchConfig:
    settings = dict(model="quick", warmup=1, steps=2, steps_per_iteration=2, sampler_steps=(3,), threads=1, isolate=False, overrides=QUICK)
    return BenchConfig(**{**settings, **kwargs})


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_every_arm_gives_a_row_with_positive_ratios_to_dpo(quick_base):
    # One subprocess per arm, as sspo bench runs on the CPU: in one process an earlier arm's memory
    # can still be held when the next arm reads its baseline, and its peak can come out negative.
    result = run_bench(quick_bench(isolate=True), log=lambda _: None)
    table = format_table(result)
    rows = result["summary"]["rows"]
    assert set(rows) == set(ARMS)
    for arm in ARMS:
        assert f"| {arm} |" in table
        row = rows[arm]
        assert "error" not in row, row
        for key in ("step_s", "p90_s", "all_in_s", "time_ratio", "memory_ratio", "all_in_ratio"):
            assert _positive(row[key]), (arm, key, row[key])
        assert len(result["arms"][arm]["step_s"]) == 2
    assert rows["dpo"]["time_ratio"] == 1.0
    # The reference forward happens in dpo's and sspo-online's step, never in the cached arms'.
    assert rows["dpo"]["in_step_reference_s"] > 0 and rows["sspo-online"]["in_step_reference_s"] > 0
    assert rows["sspo-pregenerated"]["in_step_reference_s"] == 0 and rows["dpo-cached"]["in_step_reference_s"] == 0
    assert rows["sspo-online"]["in_step_generate_s"] > 0 and rows["sspo-pregenerated"]["in_step_generate_s"] == 0
    pre = result["arms"]["sspo-pregenerated"]["pregeneration"]
    assert pre["images"] == 2 * 4 and pre["generate_s"] > 0 and pre["reference_s"] > 0
    generation = result["summary"]["generation"]
    assert set(generation["steps"]) == {"2", "3"}
    for row in generation["steps"].values():
        assert _positive(row["images_per_s"]) and 0 < row["share"] < 1
    assert "images/s" in table and "issue" not in table.lower()  # product output speaks to users
    # FLOPs: counted per arm, rates and floors in the table.
    for column in ("step GFLOP/s", "% of peak", "FLOP floor / dpo", "measured / floor", "generation GFLOP/s", "all-in FLOP floor / dpo"):
        assert column in table, column
    flops = result["arms"]["sspo-pregenerated"]["flops"]
    assert 1.5 < flops["forward_backward"] / flops["forward"] < 3.5  # LoRA: no weight gradients for the frozen base
    assert flops["forward_calls_per_sampler_step"] == pytest.approx(2, rel=0.05)  # classifier-free guidance: two forwards a step
    assert rows["dpo"]["flop_floor"] == 1 and rows["sspo-pregenerated"]["flop_floor"] > rows["dpo-cached"]["flop_floor"] == pytest.approx(1)
    assert rows["sspo-pregenerated"]["flop_floor"] > rows["sft"]["flop_floor"] > 0
    for arm in ARMS:
        assert _positive(rows[arm]["step_rate"]["flops_per_s"]) and _positive(rows[arm]["over_floor"]), arm
        assert "anonymous" in result["arms"][arm]["memory_method"]


def test_cli_runs_arms_in_subprocesses_and_writes_json_and_markdown(quick_base, tmp_path, capsys):
    out = tmp_path / "bench" / "quick-cpu"
    args = ["bench", "--model", "quick", "--warmup", "0", "--steps", "1", "--steps-per-iteration", "1", "--arms", "dpo,sspo-pregenerated",
            "--sampler-steps", "", "--threads", "1", "--clock", "cpu", "--out", str(out), *QUICK]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| dpo |" in printed and "| sspo-pregenerated |" in printed
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["cpu_cores"] >= 1
    assert result["machine"]["threads"] == 1
    for arm in ("dpo", "sspo-pregenerated"):
        r = result["arms"][arm]
        assert "error" not in r, r
        assert r["clock"] == "cpu" and r["peak_mb"] > 0 and r["peak_anon_mb"] > r["peak_mb"]
    assert "| sspo-pregenerated |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("name, unet, text", [("sd15", 859_520_964, (123_060_480,)), ("sdxl", 2_567_463_684, (123_060_480, 694_659_840))])
def test_architectures_have_the_published_parameter_counts(name, unet, text, tmp_path):
    from sspo.models.tiny import write_word_tokenizer
    from sspo.worlds.shapes import world as shapes

    tokenizer = write_word_tokenizer(tmp_path, shapes.vocabulary(), max_length=77)
    with torch.device("meta"):  # shapes only, no memory
        components = arch_components(name, tokenizer)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(components["unet"]) == unet
    assert count(components["vae"]) == 83_653_863
    encoders = [components[k] for k in ("text_encoder", "text_encoder_2") if k in components]
    assert tuple(count(m) for m in encoders) == text


@pytest.mark.parametrize("name, transformer, text", [("sd35m", 2_243_171_520, (123_650_304, 694_659_840)), ("flux", 11_901_408_320, (123_060_480,))])
def test_flow_architectures_have_the_published_transformer_and_clip_sizes(name, transformer, text, tmp_path):
    from sspo.models.tiny import write_t5_tokenizer, write_word_tokenizer
    from sspo.worlds.shapes import world as shapes

    tokenizer = write_word_tokenizer(tmp_path / "clip", shapes.vocabulary(), max_length=77)
    t5_tokenizer = write_t5_tokenizer(tmp_path / "t5", shapes.vocabulary(), max_length=512)
    with torch.device("meta"):
        components = arch_components(name, tokenizer, t5_tokenizer=t5_tokenizer)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(components["transformer"]) == transformer
    assert count(components["vae"]) == 83_819_683 and components["vae"].config.latent_channels == 16
    t5 = components["text_encoder_3" if name == "sd35m" else "text_encoder_2"]
    clips = [components[k] for k in ("text_encoder", "text_encoder_2") if components.get(k) is not t5]
    assert tuple(count(m) for m in clips) == text
    # The T5 stand-in: one layer, T5-XXL's width, which is the transformer's text width
    assert t5.config.num_layers == 1 and t5.config.d_model == components["transformer"].config.joint_attention_dim == 4096


def test_pixart_architecture_has_the_published_transformer_size(tmp_path):
    from sspo.models.tiny import write_t5_tokenizer, write_word_tokenizer
    from sspo.worlds.shapes import world as shapes

    tokenizer = write_word_tokenizer(tmp_path / "clip", shapes.vocabulary(), max_length=77)
    t5_tokenizer = write_t5_tokenizer(tmp_path / "t5", shapes.vocabulary(), max_length=512)
    with torch.device("meta"):
        components = arch_components("pixart", tokenizer, t5_tokenizer=t5_tokenizer)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # PixArt-Sigma-XL-2-1024-MS's transformer file: 2,443,492,488 bytes of fp32, i.e. these x 4 and its header
    assert count(components["transformer"]) == 610_856_096
    assert count(components["vae"]) == 83_653_863 and components["vae"].config.scaling_factor == 0.13025  # SDXL's VAE
    t5 = components["text_encoder"]
    assert t5.config.num_layers == 1 and t5.config.d_model == components["transformer"].config.caption_channels == 4096


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd35m", "flux", "pixart"])
def test_architecture_code_path_runs_at_small_widths(name, tmp_path):
    """The SD-1.5 / SDXL / SD3.5 / FLUX / PixArt topologies (two or three text encoders, pooled embeds, time
    ids, a T5 alone, or flow matching with the pipeline's sampler) through the bench."""
    from sspo.worlds.shapes import world as shapes

    folder = build_arch(name, tmp_path / name, small=True, words=shapes.vocabulary())
    b = BenchConfig(model=str(folder), warmup=0, steps=1, steps_per_iteration=1, arms=("dpo", "sspo-pregenerated"), sampler_steps=(),
                    batch_size=2, threads=1, isolate=False, overrides=("negatives.steps=2",))
    result = run_bench(b, log=lambda _: None)
    for arm in b.arms:
        assert "error" not in result["summary"]["rows"][arm], result["arms"][arm]
    assert result["arms"]["sspo-pregenerated"]["pregeneration"]["images"] == 2
    assert result["model"]["model"] == name and result["model"]["small"]
    flow = name in ("sd35m", "flux")
    assert ("T5 stand-in" in result["model"].get("text_encoder", "")) == (flow or name == "pixart")
    scheduler = "pipeline" if flow else "dpm++" if name == "pixart" else "ddim"  # the family's config's sampler, the demo's otherwise
    assert result["summary"]["generation"]["scheduler"] == scheduler


def test_flow_models_train_with_their_shipped_configs_settings(tmp_path):
    from sspo.benchmark.config import train_config
    from sspo.worlds.shapes import world as shapes

    folder = build_arch("flux", tmp_path / "flux", small=True, words=shapes.vocabulary())
    cfg = train_config(BenchConfig(model=str(folder)), "sft", tmp_path / "out")
    assert "ff_context.net.2" in cfg.model.lora_targets and cfg.flow.weighting_scheme == "none" and cfg.flow.guidance_scale == 3.5
    assert (cfg.negatives.scheduler, cfg.negatives.steps, cfg.negatives.guidance_scale) == ("pipeline", 28, 3.5)
    assert cfg.data.cache_latents and cfg.data.resolution == 64  # T5 runs once, before the steps; the small VAE's native side


def test_a_pixart_folder_trains_with_its_shipped_configs_targets_and_sampler(tmp_path):
    """A family's shipped config says what its layers are called (the demo's UNet targets name none of a DiT's)."""
    from sspo.benchmark.config import train_config

    from tiny_pipelines import build_pixart_pipeline

    folder = build_pixart_pipeline(tmp_path / "pixart")
    cfg = train_config(BenchConfig(model=str(folder)), "sft", tmp_path / "out")
    assert cfg.model.lora_targets == ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    assert (cfg.negatives.scheduler, cfg.negatives.steps, cfg.negatives.guidance_scale) == ("dpm++", 20, 4.5) and cfg.data.cache_latents


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for machines without a GPU")
@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_full_architectures_refuse_the_cpu_unless_allowed(name):
    with pytest.raises(SSPOError, match="--allow-cpu"):
        run_bench(BenchConfig(model=name), log=lambda _: None)


def test_bad_arm_is_a_config_error():
    with pytest.raises(SSPOError, match="arms"):
        BenchConfig(arms=("ppo",))


def test_a_setting_this_machine_cannot_run_is_one_line_before_any_arm(tmp_path, capsys, monkeypatch):
    from sspo.cli import main
    from sspo.commands import bench

    monkeypatch.setattr(bench, "_run_isolated", lambda *a: pytest.fail("an arm ran"))
    argv = ["bench", "--model", "quick", "--arms", "sft,dpo", "--mixed-precision", "fp16", "--steps", "1", "--warmup", "0", "--sampler-steps", "2",
            "--out", str(tmp_path / "bench")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == (
        "sspo: error: --mixed-precision: fp16 needs a GPU and torch sees none; pass --mixed-precision bf16 (which runs on the CPU) or --mixed-precision no")


def test_an_existing_out_is_replaced_only_with_force(tmp_path, capsys, monkeypatch):
    from sspo.cli import main
    from sspo.commands import bench

    (tmp_path / "summary.md").write_text("an eval's table")
    monkeypatch.setattr(bench, "run_bench", lambda b: pytest.fail("measured before refusing --out"))
    assert main(["bench", "--model", "quick", "--out", str(tmp_path / "summary")]) == 2
    assert capsys.readouterr().err.strip() == (f"sspo: error: --out {tmp_path / 'summary'}: {tmp_path / 'summary.md'} exist already; "
                                               "pass --force to replace them, or name another --out")
    assert (tmp_path / "summary.md").read_text() == "an eval's table"


def test_an_out_under_a_file_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    from sspo.cli import main
    from sspo.commands import bench

    (tmp_path / "afile.txt").write_text("a user's file")
    monkeypatch.setattr(bench, "run_bench", lambda b: pytest.fail("measured before refusing --out"))
    assert main(["bench", "--model", "quick", "--out", str(tmp_path / "afile.txt" / "b")]) == 2
    assert capsys.readouterr().err.strip() == (f"sspo: error: --out {tmp_path / 'afile.txt' / 'b'}: {tmp_path / 'afile.txt'} is a file, "
                                               "not a folder; choose another --out")


def test_a_list_flag_that_is_not_integers_is_one_line(capsys):
    from sspo.cli import main

    assert main(["bench", "--model", "quick", "--sampler-steps", "abc"]) == 2
    assert capsys.readouterr().err.strip() == "sspo: error: --sampler-steps takes comma-separated integers, e.g. 20,50; got 'abc'"


def test_every_flag_is_helped_by_its_fields_comment_and_the_numbers_it_states_hold(capsys):
    from sspo.benchmark.config import BASELINE, REALISTIC_BATCH, REALISTIC_NEGATIVES

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"batch >= {REALISTIC_BATCH}" in text and f">= {REALISTIC_NEGATIVES} negatives" in text
    assert f"--arms ARMS the training setups measured; ratios are to {BASELINE}'s (comma-separated, some of sft,dpo," in text
    assert "--sampler-steps SAMPLER_STEPS also measure negative generation at these sampler steps (the paper's 20-50) (comma-separated)" in text
