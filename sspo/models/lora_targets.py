"""``model.lora_targets`` checked against the denoiser they are meant for, before peft wraps anything.

peft wraps a layer when its name is a target or ends with ``.<target>``; a target that names no
layer is skipped (when every target misses, peft raises deep inside). So a misspelt target would
train less than asked, or nothing, without a word: each target must name a layer LoRA can wrap.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import torch

from sspo.errors import ConfigError

# The layer types peft's LoRA wraps (diffusers' LoRA-compatible layers subclass them).
LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
_SHOWN = 30  # layer names an error lists (a UNet of the SD family has about 20 distinct ones)


def lora_layer_names(denoiser, motion_only: bool) -> list[str]:
    """The full names of the layers LoRA can wrap: all of the denoiser's, or its motion modules' only."""
    return [name for name, module in denoiser.named_modules() if isinstance(module, LORA_LAYERS) and (not motion_only or re.search(r"(^|\.)motion_modules\.", name))]


def check_lora_targets(denoiser, targets: Sequence[str], motion_only: bool, label: str) -> None:
    """Refuse targets that name no layer LoRA can wrap, listing layer names the denoiser (``label``: what messages call it) has,
    and a denoiser that takes no LoRA adapter at all."""
    if not hasattr(denoiser, "add_adapter"):  # diffusers' PeftAdapterMixin: what the trainer adds the LoRA with
        raise ConfigError(f"config key 'model.lora': this {type(denoiser).__name__} takes no LoRA adapter in diffusers; set model.lora=false to fine-tune it fully")
    layers = lora_layer_names(denoiser, motion_only)
    missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in layers)]
    if not missing:
        return
    where = "motion modules" if motion_only else label
    short = sorted({_short_name(name) for name in layers})
    close = [n for t in missing for n in difflib.get_close_matches(t, short, n=3)]
    shown = list(dict.fromkeys([*close, *short]))[:_SHOWN]
    raise ConfigError(
        f"config key 'model.lora_targets': {', '.join(map(repr, missing))} name{'s' if len(missing) == 1 else ''} no layer of the {where} that LoRA can wrap; "
        f"layer names there include {', '.join(shown)}{', ...' if len(short) > len(shown) else ''}: set model.lora_targets to some of them"
    )


def _short_name(name: str) -> str:
    """A layer's name as a target names it: its last part, with the one before it when that is an index (to_out.0)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
