"""Typed configs (from_dict / apply_overrides / load_config) with TrainConfig, and atomic writes."""

import pathlib
from pathlib import Path

import pytest
import yaml

from sspo.config import apply_overrides, from_dict, load_config, save_yaml, to_dict
from sspo.errors import ConfigError
from sspo.io import atomic_path, atomic_write_text
from sspo.train_config import TrainConfig

_ROOT = Path(__file__).resolve().parents[1]
# the demo config lives in configs/ (possibly a link to the packaged sspo/configs/)
DEMO = next(
    (p for p in (_ROOT / "configs" / "demo-shapes.yaml", _ROOT / "sspo" / "configs" / "demo-shapes.yaml") if p.is_file()),
    _ROOT / "configs" / "demo-shapes.yaml",
)


def load(*overrides, path=DEMO):
    return load_config(TrainConfig, path, list(overrides))


# ----------------------------------------------------------------------------------------------
# Loading


def test_demo_yaml_loads():
    cfg = load()
    assert isinstance(cfg, TrainConfig)
    assert cfg.method == "sspo"
    assert cfg.beta == 500.0 and isinstance(cfg.beta, float)
    assert cfg.ssr == "sign" and cfg.erd == "uniform"
    raw = yaml.safe_load(DEMO.read_text())  # every value in the file arrives typed, nothing dropped
    assert cfg.iterations == raw["iterations"] and cfg.steps_per_iteration == raw["steps_per_iteration"]
    assert cfg.optim.learning_rate == pytest.approx(float(raw["optim"]["learning_rate"]))
    assert cfg.optim.batch_size == raw["optim"]["batch_size"]
    assert cfg.model.pretrained == "shapes-base" and cfg.model.lora is True
    assert cfg.data.source == "shapes" and cfg.data.resolution == 32
    assert cfg.negatives.steps == raw["negatives"]["steps"] and cfg.negatives.batch_size == raw["negatives"]["batch_size"]
    assert cfg.validation.shapes_eval is True
    assert cfg.model.lora_targets == tuple(raw["model"]["lora_targets"])  # a YAML list becomes a tuple
    # keys the file leaves out keep their defaults
    assert cfg.optim.weight_decay == pytest.approx(1e-2)


def test_no_file_gives_defaults():
    cfg = load_config(TrainConfig, None)
    assert cfg == TrainConfig()


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "nope.yaml")


def test_save_yaml_roundtrip(tmp_path):
    cfg = load("method=dpo", "model.lora_targets=to_q,to_v")
    save_yaml(cfg, tmp_path / "cfg.yaml")
    again = load_config(TrainConfig, tmp_path / "cfg.yaml")
    assert to_dict(again) == to_dict(cfg)


# ----------------------------------------------------------------------------------------------
# Overrides


def test_overrides_apply():
    cfg = load("optim.learning_rate=3e-4", "method=sft")
    assert cfg.optim.learning_rate == pytest.approx(3e-4)
    assert isinstance(cfg.optim.learning_rate, float)
    assert cfg.method == "sft"


def test_exponent_without_dot_in_yaml_file(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string; a float field still accepts it
    path = tmp_path / "cfg.yaml"
    path.write_text("optim:\n  learning_rate: 1e-4\nbeta: 2500\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.optim.learning_rate == pytest.approx(1e-4)
    assert cfg.beta == 2500.0 and isinstance(cfg.beta, float)


def test_apply_overrides_nested_in_place():
    data = {"optim": {"batch_size": 2}}
    out = apply_overrides(data, ["optim.batch_size=8", "negatives.steps=5", "pregenerate=false", "data.max_samples=null"])
    assert out is data
    assert data == {"optim": {"batch_size": 8}, "negatives": {"steps": 5}, "pregenerate": False, "data": {"max_samples": None}}


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.learning_rate"])


def test_override_through_a_non_section():
    with pytest.raises(ConfigError, match="method"):
        apply_overrides({"method": "sspo"}, ["method.x=1"])


def test_int_and_bool_overrides():
    cfg = load("iterations=7", "pregenerate=false", "data.max_samples=100")
    assert cfg.iterations == 7 and cfg.pregenerate is False and cfg.data.max_samples == 100


# ----------------------------------------------------------------------------------------------
# Unknown keys, ranges, types


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="'learning_rate'"):
        load("learning_rate=1e-4")
    with pytest.raises(ConfigError, match="'bogus'"):
        from_dict(TrainConfig, {"bogus": 1})


def test_unknown_nested_key():
    with pytest.raises(ConfigError, match=r"'optim\.lr'"):
        load("optim.lr=1e-4")
    with pytest.raises(ConfigError, match=r"'negatives\.guidance'"):
        from_dict(TrainConfig, {"negatives": {"guidance": 3.0}})


@pytest.mark.parametrize(
    "override, key",
    [
        ("beta=-1", "beta"),
        ("beta=0", "beta"),
        ("method=foo", "method"),
        ("ssr=bar", "ssr"),
        ("erd=baz", "erd"),
        ("erd_per=epoch", "erd_per"),
        ("iterations=0", "iterations"),
        ("steps_per_iteration=-3", "steps_per_iteration"),
        ("optim.learning_rate=-1e-4", "optim.learning_rate"),
        ("optim.batch_size=0", "optim.batch_size"),
        ("model.lora_rank=0", "model.lora_rank"),
        ("negatives.scheduler=plms", "negatives.scheduler"),
        ("data.mode=both", "data.mode"),
        ("mixed_precision=fp8", "mixed_precision"),
    ],
)
def test_out_of_range_names_key(override, key):
    with pytest.raises(ConfigError) as info:
        load(override)
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"iterations": "five"}, "iterations"),
        ({"iterations": "5"}, "iterations"),  # a string is not an int
        ({"iterations": True}, "iterations"),  # nor is a bool
        ({"iterations": 2.5}, "iterations"),
        ({"optim": {"batch_size": "16"}}, "optim.batch_size"),
        ({"optim": {"learning_rate": "fast"}}, "optim.learning_rate"),
        ({"beta": True}, "beta"),
        ({"pregenerate": "yes"}, "pregenerate"),
        ({"pregenerate": 1}, "pregenerate"),
        ({"method": 3}, "method"),
        ({"optim": 3}, "optim"),
        ({"data": {"max_samples": "all"}}, "data.max_samples"),
    ],
)
def test_wrong_types_rejected(data, key):
    with pytest.raises(ConfigError) as info:
        from_dict(TrainConfig, data)
    assert f"'{key}'" in str(info.value)


def test_wrong_type_via_override():
    with pytest.raises(ConfigError, match="'iterations'"):
        load("iterations=five")


def test_int_accepted_for_float():
    cfg = from_dict(TrainConfig, {"beta": 100, "optim": {"learning_rate": 1}})
    assert cfg.beta == 100.0 and isinstance(cfg.beta, float)
    assert isinstance(cfg.optim.learning_rate, float)


def test_tuple_fields_from_comma_strings():
    cfg = load("model.lora_targets=to_q,to_v", "validation.prompts=a red circle,a blue square")
    assert cfg.model.lora_targets == ("to_q", "to_v")
    assert isinstance(cfg.model.lora_targets, tuple)
    assert cfg.validation.prompts == ("a red circle", "a blue square")
    # a YAML list works too, and a single item
    assert load("model.lora_targets=[to_k]").model.lora_targets == ("to_k",)
    assert load("model.lora_targets=to_k").model.lora_targets == ("to_k",)
    assert from_dict(TrainConfig, {"model": {"lora_targets": ["a", "b"]}}).model.lora_targets == ("a", "b")


def test_tuple_items_type_checked():
    with pytest.raises(ConfigError, match=r"model\.lora_targets\[1\]"):
        from_dict(TrainConfig, {"model": {"lora_targets": ["to_q", 3]}})


# ----------------------------------------------------------------------------------------------
# docs/method.md, "Methods": what each method implies


@pytest.mark.parametrize("erd", ["uniform", "initial", "last"])
@pytest.mark.parametrize("ssr", ["sign", "indicator", "off"])
def test_method_table(erd, ssr):
    # sft: winners only, no reference, no negatives
    cfg = TrainConfig(method="sft", erd=erd, ssr=ssr)
    assert cfg.uses_reference is False
    assert cfg.generates_negatives is False

    # dpo: dataset pairs, frozen theta_0 as reference, DPO loss
    cfg = TrainConfig(method="dpo", erd=erd, ssr=ssr)
    assert cfg.uses_reference is True
    assert cfg.generates_negatives is False
    assert cfg.effective_erd == "initial"
    assert cfg.effective_ssr == "off"

    # spin: winner + sample of the last checkpoint, which is the reference; DPO loss
    cfg = TrainConfig(method="spin", erd=erd, ssr=ssr)
    assert cfg.uses_reference is True
    assert cfg.generates_negatives is True
    assert cfg.effective_erd == "last"
    assert cfg.effective_ssr == "off"

    # sspo: winner + sample of the ERD checkpoint, which is the reference; SSPO loss as configured
    cfg = TrainConfig(method="sspo", erd=erd, ssr=ssr)
    assert cfg.uses_reference is True
    assert cfg.generates_negatives is True
    assert cfg.effective_erd == erd
    assert cfg.effective_ssr == ssr


def test_sspo_defaults_are_rcr_and_sign():
    cfg = TrainConfig()
    assert cfg.method == "sspo"
    assert cfg.effective_erd == "uniform"
    assert cfg.effective_ssr == "sign"


# ----------------------------------------------------------------------------------------------
# io.atomic_write_text


def test_atomic_write_text_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "hello\n")
    assert path.read_text() == "hello\n"
    atomic_write_text(path, "again\n")
    assert path.read_text() == "again\n"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_atomic_write_text_does_not_clobber_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("old content\n")
    original = pathlib.Path.write_text

    def half_write_then_fail(self, text, *args, **kwargs):
        original(self, text[:3], *args, **kwargs)  # partial output on the temp file
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_text", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new content that never lands\n")
    monkeypatch.undo()
    assert path.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_path_writer_raises(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            assert tmp.parent == path.parent and tmp != path
            tmp.write_bytes(b"partial")
            raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_text_new_file_failure_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "new.txt"

    def fail(self, text, *args, **kwargs):
        raise OSError("boom")

    monkeypatch.setattr(pathlib.Path, "write_text", fail)
    with pytest.raises(OSError):
        atomic_write_text(path, "x")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
