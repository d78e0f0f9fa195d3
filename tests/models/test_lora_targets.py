"""``model.lora_targets`` must name layers of the denoiser (a UNet, an SD3 transformer): a target that names none is one line, not a LoRA that trains less (or nothing)."""

import pytest

from sspo.cli import main
from sspo.errors import ConfigError
from sspo.models.lora_targets import check_lora_targets
from sspo.models.pipeline import load_pipeline
from sspo.worlds.names import resolve_model


@pytest.fixture(scope="module")
def unet(quick_base):
    return load_pipeline(quick_base).unet


def test_targets_naming_layers_pass(unet):
    check_lora_targets(unet, ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"), motion_only=False, label="UNet")


def test_unknown_targets_are_named_with_layer_names_the_unet_has(unet):
    with pytest.raises(ConfigError) as info:
        check_lora_targets(unet, ("to_q", "to_qq", "bogus"), motion_only=False, label="UNet")
    message = str(info.value)
    assert message.startswith("config key 'model.lora_targets': 'to_qq', 'bogus' name no layer of the UNet that LoRA can wrap; layer names there include to_q,")
    assert "to_out.0" in message and message.endswith("set model.lora_targets to some of them")


def test_a_module_that_is_not_a_layer_is_refused(unet):
    """peft wraps layers (linear, conv, embedding), not the blocks holding them."""
    with pytest.raises(ConfigError, match=r"'down_blocks' names no layer of the UNet"):
        check_lora_targets(unet, ("down_blocks",), motion_only=False, label="UNet")


def test_motion_only_targets_must_be_in_the_motion_modules():
    video_unet = load_pipeline(resolve_model("moving-shapes-base:quick")).unet
    check_lora_targets(video_unet, ("to_q", "to_out.0"), motion_only=True, label="UNet")
    with pytest.raises(ConfigError, match=r"'conv1' names no layer of the motion modules"):
        check_lora_targets(video_unet, ("to_q", "conv1"), motion_only=True, label="UNet")  # conv1 is in the UNet's resnets only


def test_a_transformer_is_named_as_such(tiny_sd3):
    """The demo's convolution targets name no layer of an SD3 transformer, which the message calls what it is."""
    from sspo.models.families import family_of

    family = family_of(load_pipeline(tiny_sd3))
    assert family.lora_targets(family.denoiser, ("to_q", "to_out.0", "add_k_proj"), "unet") == ["to_q", "to_out.0", "add_k_proj"]
    with pytest.raises(ConfigError, match=r"'conv1' names no layer of the transformer that LoRA can wrap; layer names there include"):
        family.lora_targets(family.denoiser, ("to_q", "conv1"), "unet")


def test_training_with_an_unknown_target_stops_in_one_line(quick_base, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  pretrained: {quick_base}\n  lora_targets: [to_q, attention]\ndata:\n  source: shapes\n  resolution: 32\n"
                      "report_to: none\niterations: 1\nsteps_per_iteration: 1\n")
    assert main(["train", str(config), f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sspo: error:")]
    assert len(errors) == 1 and "'attention' names no layer of the UNet" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()


def test_a_denoiser_without_lora_support_is_one_line():
    import torch

    class Denoiser(torch.nn.Module):  # a model class without diffusers' PeftAdapterMixin
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(4, 4)

    with pytest.raises(ConfigError, match=r"^config key 'model.lora': this Denoiser takes no LoRA adapter in diffusers; set model.lora=false to fine-tune it fully$"):
        check_lora_targets(Denoiser(), ("to_q",), motion_only=False, label="denoiser")
