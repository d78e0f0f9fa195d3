"""The linear MLP head of the LAION aesthetic predictor, reused unchanged by ImageReward."""

from __future__ import annotations

import torch
from torch import nn

from sspo.errors import ModelError
from sspo.evaluation.scorers.base import check_keys


class LinearMLP(nn.Module):
    """Five linear layers with dropout and no activations: a linear map in effect.

    Both published heads were trained with their ReLUs commented out; the dropouts stay so that the
    state-dict keys are the published ones: ``layers.{0,2,4,6,7}.{weight,bias}``.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], what: str) -> LinearMLP:
        if "layers.0.weight" not in state_dict:
            raise ModelError(f"{what}: no layers.0.weight in the weights (keys: {', '.join(list(state_dict)[:6])})")
        head = cls(state_dict["layers.0.weight"].shape[1])
        check_keys({k: v.shape for k, v in head.state_dict().items()}, state_dict, what)
        head.load_state_dict(state_dict)
        return head.eval().requires_grad_(False)
