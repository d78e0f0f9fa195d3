"""Typed configs (from_dict / apply_overrides / load_config) with TrainConfig, and atomic writes."""

import ast
import dataclasses
import importlib
import pathlib
import re
import shutil
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml

import sspo
from sspo.cli import main
from sspo.config import allowed, apply_overrides, field_comments, field_type, from_dict, load_config, load_yaml, save_yaml, setting, to_dict, validate
from sspo.errors import ConfigError, ModelError
from sspo.io import atomic_path, atomic_write_text
from sspo.training.config import OptimConfig, TrainConfig, check_environment, resolved
from sspo.worlds.shapes.base_model import BaseConfig

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
    assert cfg.validation.world_eval is True
    assert cfg.model.lora_targets == tuple(raw["model"]["lora_targets"])  # a YAML list becomes a tuple
    # keys the file leaves out keep their defaults
    assert cfg.optim.weight_decay == pytest.approx(1e-2)


def test_no_file_gives_defaults():
    cfg = load_config(TrainConfig, None)
    assert cfg == TrainConfig()


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "nope.yaml")


def test_a_file_that_is_not_a_mapping_is_config_error_with_an_example(tmp_path):
    (tmp_path / "list.yaml").write_text("- method: sspo\n")
    with pytest.raises(ConfigError, match=r"list.yaml must contain a mapping at the top level \(key: value lines, e.g. method: sspo\), not a list$"):
        load_config(TrainConfig, tmp_path / "list.yaml")


@pytest.mark.parametrize("name", ["sd15-lora.yaml", "sd15-lora"])
def test_a_shipped_config_is_found_by_name_from_any_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(TrainConfig, name).model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    (tmp_path / "sd15-lora.yaml").write_text("method: sft\n")  # a file of that name here is the one meant
    assert load_config(TrainConfig, name).method == "sft"


def test_a_missing_config_lists_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "sd15-lroa", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sspo: error: config file sd15-lroa does not exist; pass a YAML file, a run folder, or a shipped config by name: ")
    assert "\n" not in err and "demo-shapes, " in err and "sd15-lora, sd35-lora, sdxl-lora" in err
    (tmp_path / "empty").mkdir()
    assert main(["train", "empty", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("sspo: error: empty is a folder without a config.yaml; pass a YAML file, a run folder, ")


def test_a_run_folder_names_the_config_it_trained_with(tmp_path):
    save_yaml(load("method=dpo", "optim.learning_rate=3e-4"), tmp_path / "run" / "config.yaml")
    cfg = load_config(TrainConfig, tmp_path / "run", ["iterations=9"])
    assert (cfg.method, cfg.optim.learning_rate, cfg.iterations) == ("dpo", 3e-4, 9)
    assert cfg.output_dir == str(tmp_path / "run")  # where the folder lies now, not where its config says it was trained


def test_a_folder_named_as_a_shipped_config_leaves_its_output_dir_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-shapes").mkdir()  # no config.yaml: the shipped config of that name is meant
    assert load_config(TrainConfig, "demo-shapes").output_dir == "runs/demo-shapes"


def test_save_yaml_roundtrip(tmp_path):
    cfg = load("method=dpo", "model.lora_targets=[to_q, to_v]", 'validation.prompts=["a red circle, white background"]')
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


def test_a_mapping_override_merges_into_its_section_as_the_keys_one_by_one_would():
    data = {"optim": {"batch_size": 2, "learning_rate": 1e-3}, "data": {"source": "shapes"}, "validation": {"scorer_paths": {"pickscore": "ps"}}}
    apply_overrides(data, ["optim={learning_rate: 0.0001}", "data={source: parquet, frames: 8}", "validation.scorer_paths={}"], TrainConfig)
    assert data == {"optim": {"batch_size": 2, "learning_rate": 1e-4}, "data": {"source": "parquet", "frames": 8},
                    "validation": {"scorer_paths": {}}}  # a dict field's mapping replaces it: {} clears it


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
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rate' \(did you mean 'optim.learning_rate'\?\); valid keys here: beta,"):
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


def test_a_string_key_set_on_the_command_line_takes_the_text_typed():
    cfg = load("data.source=parquet", "data.path=0123", "tracker_run_name=1e3", "data.caption_column=true", "model.revision=null", path=None)
    assert (cfg.data.path, cfg.tracker_run_name, cfg.data.caption_column, cfg.model.revision) == ("0123", "1e3", "true", None)
    with pytest.raises(ConfigError, match=r"^config key 'data.path': expected a string, got 2024; quote it to pass it as text$"):
        from_dict(TrainConfig, {"data": {"source": "parquet", "path": 2024}})  # a YAML file's value is YAML's


def test_a_path_beside_a_world_source_is_an_error_not_ignored():
    with pytest.raises(ConfigError, match=r"^config key 'data\.path': is set, but data\.source 'shapes' is a world.*drop data\.path"):
        from_dict(TrainConfig, {"data": {"source": "shapes", "path": "my-images"}})
    assert from_dict(TrainConfig, {"data": {"source": "imagefolder", "path": "my-images"}}).data.path == "my-images"


def test_int_accepted_for_float():
    cfg = from_dict(TrainConfig, {"beta": 100, "optim": {"learning_rate": 1}})
    assert cfg.beta == 100.0 and isinstance(cfg.beta, float)
    assert isinstance(cfg.optim.learning_rate, float)


def test_list_values_are_yaml_lists_and_a_bare_string_is_one_item():
    cfg = load("model.lora_targets=[to_q, to_v]", 'validation.prompts=["a red circle, white background", a blue square]')
    assert cfg.model.lora_targets == ("to_q", "to_v")
    assert isinstance(cfg.model.lora_targets, tuple)
    assert cfg.validation.prompts == ("a red circle, white background", "a blue square")  # a quoted comma stays in its item
    assert load("model.lora_targets=to_k").model.lora_targets == ("to_k",)
    assert load("validation.prompts=a small red circle on the left").validation.prompts == ("a small red circle on the left",)
    assert from_dict(TrainConfig, {"model": {"lora_targets": ["a", "b"]}}).model.lora_targets == ("a", "b")


@pytest.mark.parametrize("override", ["validation.prompts=a red circle, white background", "model.lora_targets=to_q,to_v"])
def test_a_bare_string_holding_a_comma_is_refused_with_the_list_forms(override):
    """One item or several? Neither guess is safe (every shapes prompt holds a comma)."""
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError) as info:
        load(override)
    assert str(info.value).startswith(f"config key '{key}': got {value!r}")
    assert f"""{key}='["{value}"]' for one item""" in str(info.value) and f"{key}='[{value}]' for several" in str(info.value)


def test_a_comma_in_a_yaml_file_scalar_is_refused_too(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("validation:\n  prompts: a red circle, white background\n")
    with pytest.raises(ConfigError, match=r"'validation\.prompts'.*holding a comma"):
        load_config(TrainConfig, path)
    path.write_text("validation:\n  prompts: [\"a red circle, white background\"]\n")
    assert load_config(TrainConfig, path).validation.prompts == ("a red circle, white background",)


def test_tuple_items_type_checked():
    with pytest.raises(ConfigError, match=r"model\.lora_targets\[1\]"):
        from_dict(TrainConfig, {"model": {"lora_targets": ["to_q", 3]}})


# ----------------------------------------------------------------------------------------------
# Declared constraints: every config field states what it accepts; one validator enforces it


def _config_classes() -> list[type]:
    """Every config dataclass of the package (a dataclass named *Config), found in its source."""
    package = Path(sspo.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                module = importlib.import_module(".".join(path.relative_to(package.parent).with_suffix("").parts))
                found.append(getattr(module, node.name))
    return found


CONFIG_CLASSES = _config_classes()


def test_every_config_field_is_documented_where_it_is_declared():
    """A comment on the field's lines, or a comment block right above it."""
    undocumented = [f"{cls.__name__}.{name}" for cls in CONFIG_CLASSES for name, text in field_comments(cls).items() if not text]
    assert undocumented == []


@dataclasses.dataclass
class Documented:
    plain: int = 1  # on its line
    # a block
    # above it
    above: int = 2
    spread: tuple[int, ...] = setting(
        (1, 2),  # on its first line
        at_least=1,
    )  # and its last
    bare: str = ""


def test_a_fields_documentation_is_its_comments():
    assert field_comments(Documented) == {"plain": "on its line", "above": "a block above it", "spread": "on its first line and its last", "bare": ""}


# Strings any value of which is fine (paths, ids, free text); every other string field declares its choices.
FREE_TEXT = {
    "ModelConfig": {"revision", "variant", "motion_adapter"},
    "DataConfig": {"path", "split"},
    "ValidationConfig": {"prompts"},
    "EvalConfig": {"prompt_source"},
    "BenchConfig": {"model", "overrides"},  # model: a name or a folder, checked in __post_init__; overrides: TrainConfig's own checks
}


def _roots() -> list[tuple[type, tuple[str, ...]]]:
    """(class, its path from a root config) of every config class: a section under the config that holds it."""
    nested = {}
    for cls in CONFIG_CLASSES:
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                nested[tp] = (cls, f.name)
    located = []
    for cls in CONFIG_CLASSES:
        path, top = [], cls
        while top in nested:
            top, name = nested[top]
            path.insert(0, name)
        located.append((cls, top, tuple(path)))
    return located


def _valid(rule, item_type):
    """A value ``rule`` allows (for a required field the bad-value cases leave alone)."""
    if rule is None:
        return {int: 1, float: 1.0, str: "x", bool: False}[item_type]
    if rule.choices:
        return rule.choices[0]
    low = rule.at_least if rule.at_least is not None else (rule.above + 1 if rule.above is not None else 1)
    return type(1 if item_type is int else 1.0)(rule.multiple_of or low)


def _bad_values(rule, item_type) -> list:
    """Values just outside what ``rule`` allows, one per constraint it declares."""
    step = 1 if item_type is int else 0.5
    bad = []
    if rule.own_folder:
        bad += ["", ".", "/", "~", "..", str(Path.home()), str(Path.cwd())]
    if rule.choices is not None:
        bad.append("no-such-choice")
    if rule.nonempty and item_type is str and not rule.own_folder:
        bad.append("")
    if rule.at_least is not None:
        bad.append(item_type(rule.at_least - step))
    if rule.above is not None:
        bad.append(item_type(rule.above))
    if rule.at_most is not None:
        bad.append(item_type(rule.at_most + step))
    if rule.below is not None:
        bad.append(item_type(rule.below))
    if rule.multiple_of is not None:
        bad.append(item_type((rule.at_least or rule.multiple_of) + 1))
    return bad


def _cases():
    for cls, root, path in _roots():
        required = {f.name: _valid(allowed(f), field_type(cls, f.name)[0]) for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        for f in dataclasses.fields(cls):
            rule = allowed(f)
            if rule is None:
                continue
            item_type, optional, is_list = field_type(cls, f.name)
            key = ".".join([*path, f.name])
            if is_list and rule.nonempty:
                yield pytest.param(root, path, required, f.name, (), key, "got [], expected a non-empty list", id=f"{root.__name__}:{key}=[]")
            for value in _bad_values(rule, item_type):
                expected = f"expected {rule.describe(item_type)}{', or null' if optional else ''}"
                shown_key = f"{key}[0]" if is_list else key
                yield pytest.param(root, path, required, f.name, (value,) if is_list else value, shown_key, f"got {value!r}, {expected}", id=f"{root.__name__}:{key}={value!r}")


def _nested(path: tuple[str, ...], values: dict) -> dict:
    for name in reversed(path):
        values = {name: values}
    return values


def test_every_config_class_is_found():
    names = {cls.__name__ for cls in CONFIG_CLASSES}
    assert {"TrainConfig", "ModelConfig", "OptimConfig", "NegativesConfig", "ValidationConfig", "DiagnosticsConfig",
            "DataConfig", "EvalConfig", "BaseConfig", "VideoBaseConfig", "BenchConfig"} <= names


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_number_and_choice_field_declares_what_it_accepts(cls):
    """A new int, float or string field without a declared range or choices fails here."""
    for f in dataclasses.fields(cls):
        item_type, _, _ = field_type(cls, f.name)
        rule = allowed(f)
        if item_type in (int, float):
            assert rule is not None and any(b is not None for b in (rule.at_least, rule.above, rule.at_most, rule.below, rule.choices)), \
                f"{cls.__name__}.{f.name}: declare its range with setting(..., at_least=/above=/at_most=/below=)"
        elif item_type is str:
            assert rule is not None or f.name in FREE_TEXT.get(cls.__name__, ()), \
                f"{cls.__name__}.{f.name}: declare its choices with setting(..., choices=...), or list it in FREE_TEXT if any string will do"


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_default_is_allowed(cls):
    for _, root, path in [r for r in _roots() if r[0] is cls]:
        required = {f.name: _valid(allowed(f), field_type(cls, f.name)[0]) for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        validate(from_dict(root, _nested(path, required)))


@pytest.mark.parametrize("root, path, required, name, value, key, message", list(_cases()))
def test_every_constrained_field_refuses_values_outside_its_range(root, path, required, name, value, key, message):
    with pytest.raises(ConfigError) as info:
        from_dict(root, _nested(path, {**required, name: value}))
    assert str(info.value) == f"config key '{key}': {message}"


@pytest.mark.parametrize(
    "override, line",
    [
        ("optim.batch_size=0", "config key 'optim.batch_size': got 0, expected an integer >= 1"),
        ("log_every=0", "config key 'log_every': got 0, expected an integer >= 1"),
        ("save_every_steps=-1", "config key 'save_every_steps': got -1, expected an integer >= 0"),
        ("model.lora_alpha=0", "config key 'model.lora_alpha': got 0, expected an integer >= 1"),
        ("model.lora_targets=[]", "config key 'model.lora_targets': got [], expected a non-empty list"),
        ("negatives.steps=0", "config key 'negatives.steps': got 0, expected an integer >= 1"),
        ("negatives.eta=1.5", "config key 'negatives.eta': got 1.5, expected a number in [0, 1]"),
        ("negatives.guidance_scale=-1", "config key 'negatives.guidance_scale': got -1.0, expected a number >= 0, or null"),
        ("validation.every_iterations=-1", "config key 'validation.every_iterations': got -1, expected an integer >= 0"),
        ("data.resolution=36", "config key 'data.resolution': got 36, expected an integer in [8, 4096] that is a multiple of 8"),
        ("data.max_samples=0", "config key 'data.max_samples': got 0, expected an integer >= 1, or null"),
        ("optim.learning_rate=0", "config key 'optim.learning_rate': got 0.0, expected a number > 0"),
        ("negatives.scheduler=plms", "config key 'negatives.scheduler': got 'plms', expected one of 'ddim', 'pipeline', 'dpm++', 'euler', 'unipc', or null"),
        ("beta=inf", "config key 'beta': got inf, expected a number > 0, or null"),  # inf passes every bound as a comparison
        ("optim.learning_rate=1e400", "config key 'optim.learning_rate': got inf, expected a number > 0"),
        ("data.bucket_max_aspect=inf", "config key 'data.bucket_max_aspect': got inf, expected a number in [1, 16]"),
        ("validation.seed=18446744073709551616", "config key 'validation.seed': got 18446744073709551616, expected an integer in [0, 4294967295]"),
        ("process_timeout_s=100000000000000", "config key 'process_timeout_s': got 100000000000000, expected an integer in [1, 1000000000]"),
        ("optim.lr_scheduler=polynomial optim.learning_rate=1e-8",
         "config key 'optim.learning_rate': got 1e-08, but polynomial decays to diffusers' end value 1e-07, which must be lower; "
         "raise optim.learning_rate or choose another optim.lr_scheduler"),
    ],
)
def test_the_dry_run_refuses_an_out_of_range_value_in_one_line(override, line, tmp_path, capsys):
    """The dry run and a real run load the config the same way, so both stop here, before anything else."""
    assert main(["train", str(DEMO), *override.split(), f"output_dir={tmp_path / 'run'}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert [l for l in err.splitlines() if l.startswith("sspo: error:")] == [f"sspo: error: {line}"]
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_eval_refuses_an_out_of_range_flag_before_loading_a_model(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--steps", "0", "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert [l for l in err.splitlines() if l.startswith("sspo: error:")] == ["sspo: error: --steps: got 0, expected an integer >= 1"]
    assert not (tmp_path / "eval").exists()


def test_a_yaml_key_that_is_not_text_is_an_unknown_key(tmp_path):
    (tmp_path / "keys.yaml").write_text("1: 2\nfoo: 3\noptim:\n  null: 1\n")
    with pytest.raises(ConfigError, match=r"^unknown config key '1'; valid keys here: "):
        load_config(TrainConfig, tmp_path / "keys.yaml")
    (tmp_path / "keys.yaml").write_text("optim:\n  true: 1\n  bogus: 2\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'optim\.True'; valid keys here: "):
        load_config(TrainConfig, tmp_path / "keys.yaml")


@pytest.mark.parametrize("section, key, value, expected", [
    ("data", "resolution", 1000000, "an integer in [8, 4096] that is a multiple of 8"),  # once a MemoryError rendering the first image
    ("data", "bucket_step", 8192, "an integer in [8, 4096] that is a multiple of 8"),
    ("data", "bucket_max_aspect", 1e9, "a number in [1, 16]"),  # once listing buckets for hours
    ("eval", "resolution", 8192, "an integer in [8, 4096] that is a multiple of 8, or null"),
    ("bench", "resolution", 8192, "an integer in [8, 4096] that is a multiple of 8, or null"),
    ("data", "frames", 10**7, "an integer in [0, 4096]"),  # once 10^7 frames asked of every clip
    ("eval", "frames", 10**7, "an integer in [1, 4096]"),
])
def test_image_sides_clip_lengths_and_bucket_aspects_are_bounded(section, key, value, expected):
    from sspo.benchmark.config import BenchConfig
    from sspo.data.config import DataConfig
    from sspo.evaluation.evaluate import EvalConfig

    cls = {"data": DataConfig, "eval": EvalConfig, "bench": BenchConfig}[section]
    shown = f"data.{key}" if section == "data" else key  # DataConfig names its keys as the data: section's
    with pytest.raises(ConfigError, match=rf"^config key '{shown}': got {value!r}, expected {re.escape(expected)}$"):
        from_dict(cls, {key: value})


def _laughs(levels: int) -> str:
    """A flow list of ``levels`` anchored lists, each holding the one before twice: 2^levels strings."""
    return "[&a0 [lol, lol], " + ", ".join(f"&a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, levels)) + "]"


def test_yaml_aliases_expanding_past_the_limit_are_one_line(tmp_path):
    """PyYAML shares an aliased value, but every walk over it expands it: a "billion laughs" config
    ended in a MemoryError writing its error message."""
    (tmp_path / "laughs.yaml").write_text(f"validation:\n  prompts: {_laughs(30)}\n")
    with pytest.raises(ConfigError, match=r"^config file .*laughs.yaml is not valid YAML: line 1, column 1: its aliases \(\*name\) expand it to \d+ values, "
                                          r"more than the 100000 a config may hold; correct the file there$"):
        load_yaml(tmp_path / "laughs.yaml")
    with pytest.raises(ConfigError, match=r"^override 'validation.prompts=\[&a0 .*': the value is not valid YAML \(line 1, column 1: its aliases"):
        apply_overrides({}, [f"validation.prompts={_laughs(20)}"])
    assert apply_overrides({}, ["validation.prompts=[&p a red circle, *p]"]) == {"validation": {"prompts": ["a red circle"] * 2}}  # a few aliases load


def test_yaml_nested_past_the_recursion_limit_is_one_line(tmp_path):
    (tmp_path / "deep.yaml").write_text("validation:\n  prompts: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"^config file .*deep.yaml is not valid YAML: it is nested deeper than Python's recursion limit \(\d+\) lets PyYAML read"):
        load_yaml(tmp_path / "deep.yaml")


def test_sections_built_in_python_are_checked_too():
    with pytest.raises(ConfigError, match=r"^config key 'optim\.batch_size': got 0, expected an integer >= 1$"):
        OptimConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"^config key 'size': got 'huge'"):
        BaseConfig.preset("huge")


# ----------------------------------------------------------------------------------------------
# output_dir


@pytest.mark.parametrize("output_dir", ["", ".", "./", "/", '"~"', "..", "{home}", "{cwd}"])
def test_an_empty_or_root_like_output_dir_is_refused(output_dir, tmp_path, capsys):
    value = output_dir.format(home=Path.home(), cwd=Path.cwd())
    assert main(["train", str(DEMO), f"output_dir={value}", "--dry-run"]) == 2
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("sspo: error:")]
    assert len(errors) == 1 and errors[0].startswith("sspo: error: config key 'output_dir': got ")
    assert "expected a folder of the run's own" in errors[0]


def test_a_bare_tilde_output_dir_is_refused_as_null():
    with pytest.raises(ConfigError, match=r"'output_dir': expected a string, got null .*quote it"):
        load("output_dir=~")


def test_an_output_dir_of_its_own_is_accepted(tmp_path):
    assert load(f"output_dir={tmp_path / 'run'}").output_dir == str(tmp_path / "run")
    assert load("output_dir=runs/sspo").output_dir == "runs/sspo"


@pytest.mark.parametrize("cache_dir", ["''", ".", "/", "{home}", "{cwd}"])
def test_a_root_like_latent_cache_dir_is_refused(cache_dir):
    """A build deletes the damaged shards and index it finds in its folder."""
    with pytest.raises(ConfigError, match=r"^config key 'data.cache_dir': got .*, expected a folder of the run's own"):
        load(f"data.cache_dir={cache_dir.format(home=Path.home(), cwd=Path.cwd())}")


def test_a_moving_average_of_a_lora_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"^config key 'optim.ema': .*model.lora=false.*optim.ema=false$"):
        load("optim.ema=true")  # the demo trains a LoRA
    assert load("optim.ema=true", "model.lora=false").optim.ema


# ----------------------------------------------------------------------------------------------
# What the machine can run: checked before anything is loaded or written


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_fp16_without_a_gpu_is_refused_and_bf16_runs(no_gpu):
    with pytest.raises(ConfigError, match=r"^config key 'mixed_precision': fp16 needs a GPU.*mixed_precision=bf16.*mixed_precision=no$"):
        check_environment(load("mixed_precision=fp16"))
    check_environment(load("mixed_precision=bf16"))  # accelerate runs bf16 autocast on the CPU
    check_environment(load("mixed_precision=no"))


def test_unset_mixed_precision_is_the_launchs_and_a_set_one_wins(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert load().mixed_precision is None and resolved(load()).mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    assert resolved(load()).mixed_precision == "bf16"
    assert resolved(load("mixed_precision=no")).mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match=r"^config key 'mixed_precision': is unset and accelerate's launch asks for 'fp8'"):
        resolved(load())


def test_unset_beta_and_sampler_are_the_model_familys_and_set_ones_win(tiny_sd3):
    def usual(*overrides):
        cfg = resolved(load("beta=null", "negatives.scheduler=null", *overrides))  # as a config that sets neither
        return cfg.beta, cfg.negatives.scheduler

    assert TrainConfig().beta is None and TrainConfig().negatives.scheduler is None
    assert usual("model.pretrained=shapes-base:quick") == (5000.0, "ddim")  # SD-1.5's: Diffusion-DPO's beta
    assert usual("model.pretrained=shapes-base:flow-quick") == (500.0, "pipeline")  # a world's base by its world, unbuilt or not
    assert usual(f"model.pretrained={tiny_sd3}") == (500.0, "pipeline")  # by its model_index.json
    assert usual(f"model.pretrained={tiny_sd3}", "beta=7", "negatives.scheduler=euler") == (7.0, "euler")
    with pytest.raises(ConfigError, match=r"^model.pretrained 'shapes-bse' is neither a folder nor a world's base; did you mean 'shapes-base'\?"):
        usual("model.pretrained=shapes-bse")  # named as the config names it, not as sample's --model


def test_fp16_without_a_gpu_stops_a_real_run_before_its_folder_is_made(no_gpu, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(DEMO), "mixed_precision=fp16", f"output_dir={run}"]) == 2
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("sspo: error:")]
    assert len(errors) == 1 and "'mixed_precision': fp16 needs a GPU" in errors[0]
    assert not run.exists()


@pytest.mark.parametrize(
    "override, module, fix",
    [
        ("optim.use_8bit_adam=true", "bitsandbytes", "pip install 'sspo[bnb]', or set optim.use_8bit_adam=false"),
        ("report_to=wandb", "wandb", "pip install 'sspo[wandb]', or set report_to=tensorboard or none"),
        ("model.attention=xformers", "xformers", "pip install xformers, or set model.attention=sdpa"),
    ],
)
def test_a_missing_optional_package_is_named_with_its_install_command(override, module, fix, a_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError, as when it is not installed
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        check_environment(load(override))
    assert str(info.value) == f"config key '{key}': needs {module}, which is not installed; {fix}"


def test_every_setting_the_machine_cannot_run_is_named_at_once(no_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError) as info:
        check_environment(load("mixed_precision=fp16", "optim.use_8bit_adam=true", "report_to=wandb"))
    assert [part.split(":")[0] for part in str(info.value).split("; config key ")] == [
        "config key 'mixed_precision'", "'optim.use_8bit_adam'", "'report_to'"]


def test_xformers_without_a_gpu_is_refused(no_gpu):
    with pytest.raises(ConfigError, match=r"^config key 'model.attention': xformers runs on a GPU only.*model.attention=sdpa$"):
        check_environment(load("model.attention=xformers"))


def test_compiling_on_the_cpu_without_a_cpp_compiler_is_refused(no_gpu, monkeypatch):
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler():
        raise InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    check_environment(load())  # negatives.compile is off by default
    with pytest.raises(ConfigError, match=r"^config key 'negatives.compile': compiles with torch's inductor.*negatives.compile=false$"):
        check_environment(load("negatives.compile=true"))


def test_the_defaults_need_nothing_optional(no_gpu):
    check_environment(load())


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
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
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


def test_unset_guidance_is_the_models_usual_and_is_recorded_resolved(quick_base, tmp_path, monkeypatch):
    from tiny_pipelines import build_sdxl_pipeline

    def guidance(*overrides):
        return resolved(load_config(TrainConfig, None, list(overrides))).negatives.guidance_scale

    sdxl = build_sdxl_pipeline(tmp_path / "sdxl")
    sd15 = shutil.copytree(quick_base, tmp_path / "sd15")  # any SD-1.5 pipeline folder
    assert load_config(TrainConfig, None).negatives.guidance_scale is None
    assert guidance(f"model.pretrained={sd15}") == 7.5
    assert guidance(f"model.pretrained={quick_base}") == 5.0  # the world's base by its cached folder
    assert guidance(f"model.pretrained={sdxl}") == 5.0
    assert guidance("model.pretrained=shapes-base:quick") == guidance("model.pretrained=moving-shapes-base") == 5.0  # the worlds' bases, by name
    assert guidance(f"model.pretrained={sd15}", "negatives.guidance_scale=3") == 3.0
    with pytest.raises(ModelError, match=r"model.family 'sd' does not fit this StableDiffusionXLPipeline, which is sdxl's"):
        guidance(f"model.pretrained={sdxl}", "model.family=sd")  # SD's components are all there, but its UNet call is not SDXL's


def test_eval_refuses_models_of_different_usual_guidance_without_the_flag(quick_base, tmp_path, capsys):
    sd15 = shutil.copytree(quick_base, tmp_path / "sd15")  # any SD-1.5 pipeline folder: 7.5
    assert main(["eval", "--model", "shapes-base:quick", "--model", str(sd15), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"sspo: error: --guidance-scale: the models are usually sampled with different guidance (shapes-base:quick: 5, {sd15}: 7.5); "
                   "pass one --guidance-scale for all of them")


@pytest.mark.parametrize("override", ["tracker_run_name=a/b", "tracker_project=..", "tracker_run_name=a\\b"])
def test_a_tracker_name_that_would_be_a_path_is_refused(override):
    with pytest.raises(ConfigError, match=r"^config key 'tracker_(project|run_name)': got .* without '/'"):
        load(override)


def test_an_unknown_validation_metric_is_refused_with_the_valid_names():
    with pytest.raises(ConfigError, match=r"^config key 'validation.metrics\[1\]': got 'pickscor', expected one of .*'pickscore', 'hpsv2'.*'shapes'"):
        load("validation.metrics=[shapes, pickscor]")


@pytest.mark.parametrize("override, message", [
    ("validation.scorer_paths.hpsv2=/w", "validation.scorer_paths': names metric 'hpsv2', which validation.metrics does not score"),
    ("validation.scorer_options.shapes=3", "validation.scorer_options.shapes': got 3, expected a mapping"),
    ("validation.every_iterations=2", "validation.metrics': has no prompts to score; set validation.prompt_file"),
])
def test_validation_metric_settings_that_cannot_apply_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load("validation.metrics=[shapes]", "validation.prompts=[]", override)
