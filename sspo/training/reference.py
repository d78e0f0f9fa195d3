"""The reference model: one pool checkpoint at a time, without a second denoiser where LoRA allows it.

With LoRA the policy denoiser carries two peft adapters: ``default`` (trained) and ``reference``
(loaded from the pool, switched on only for reference forwards and generation). With full
fine-tuning the reference is a second denoiser whose weights are reloaded from the pool when the
drawn checkpoint changes, and offloaded to the CPU while the policy trains.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from sspo.errors import TrainingError
from sspo.training.pool import CheckpointPool

POLICY, REFERENCE = "default", "reference"


class ReferenceModel:
    def __init__(self, denoiser, pool: CheckpointPool, lora: bool, device: torch.device, dtype: torch.dtype):
        self.denoiser, self.pool, self.lora, self.device = denoiser, pool, lora, device
        # Merged into half-precision weights, a LoRA update smaller than half their rounding step would vanish.
        self.fusable = lora and dtype == torch.float32
        self.loaded: int | None = None
        if lora:
            from peft import LoraConfig

            # The reference adapter mirrors the policy's; adding it makes it active, so switch back.
            denoiser.add_adapter(LoraConfig(**denoiser.peft_config[POLICY].to_dict()), adapter_name=REFERENCE)
            denoiser.set_adapter(POLICY)
            self.copy = None
        else:
            # Each weight in the policy's own dtype (trained ones fp32 under mixed precision): the
            # reference at theta_n then computes what the policy computed there, as SSR's switch needs.
            self.copy = copy.deepcopy(denoiser).requires_grad_(False).eval()

    def policy_state(self) -> dict[str, torch.Tensor]:
        """What the pool stores for the current policy: its adapter, or its trained weights (all
        of the denoiser, or only the motion modules; the frozen rest is the same in every checkpoint)."""
        if self.lora:
            from peft import get_peft_model_state_dict

            return get_peft_model_state_dict(self.denoiser, adapter_name=POLICY)
        return {name: p.detach() for name, p in self.denoiser.named_parameters() if p.requires_grad}

    def _load(self, index: int) -> None:
        if self.loaded == index:
            return
        state = self.pool.load(index)
        if self.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.denoiser, state, adapter_name=REFERENCE)
        else:
            unexpected = self.copy.load_state_dict(state, strict=False).unexpected_keys
            if unexpected:
                raise TrainingError(f"pool checkpoint {index} in {self.pool.root} holds weights the denoiser does not have, e.g. {unexpected[0]}")
        self.loaded = index

    @contextlib.contextmanager
    def activate(self, index: int, fused: bool = False) -> Iterator[torch.nn.Module]:
        """Yield a denoiser that computes as pool checkpoint ``index`` (use under ``torch.no_grad``).

        ``fused``: with LoRA and fp32 weights, the checkpoint's adapter is merged into the base weights
        meanwhile (no extra LoRA matmuls per forward), and the base weights are restored bitwise afterwards.
        """
        self._load(index)
        if not self.lora:
            self.copy.to(self.device)
            yield self.copy
            return
        self.denoiser.set_adapter(REFERENCE)
        try:
            with merged(self.denoiser, REFERENCE) if fused and self.fusable else contextlib.nullcontext():
                yield self.denoiser
        finally:
            self.denoiser.set_adapter(POLICY)  # also makes the policy adapter trainable again

    def offload(self) -> None:
        """Free accelerator memory for the policy step (full fine-tuning holds a second denoiser)."""
        if self.copy is not None:
            self.copy.to("cpu")


@contextlib.contextmanager
def merged(denoiser: torch.nn.Module, adapter: str) -> Iterator[None]:
    """Within it, ``denoiser``'s LoRA ``adapter`` is merged into the base weights (peft's merge);
    afterwards the base weights hold their original bits again. peft's unmerge subtracts the update
    back, which leaves rounding errors in the base that would drift from merge to merge, so the
    originals are copied aside and copied back instead."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
    originals = [[(p, p.detach().clone()) for p in layer.get_base_layer().parameters()] for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.merge(adapter_names=[adapter])
        yield
    finally:
        with torch.no_grad():
            for layer, saved in zip(layers, originals):
                for param, original in saved:
                    param.copy_(original)
                layer.merged_adapters = []  # as peft's unmerge leaves it: the layer adds its adapters in each forward again
