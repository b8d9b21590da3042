"""A model of your own under membench: copy this file, change `build`, and run

    membench run workload=custom workload.factory=examples.custom_model:build technique=[activation_checkpointing]

The module must be importable from where membench runs (the repository root, or anywhere on PYTHONPATH).
`build(seed, **options)` returns CustomParts: the model, a batch function (deterministic in `step`), a loss,
the classes of the repeated blocks (kept in one nn.ModuleList so techniques can wrap them) and, optionally,
a quality function. Options come from the command line: '+workload.options={width: 128}'.

This example: a residual MLP regressing a fixed random teacher network on synthetic inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from membench.workloads.custom import CustomParts


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, d_in: int, width: int, depth: int, d_out: int):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def build(seed: int, d_in: int = 32, width: int = 64, depth: int = 4, d_out: int = 8) -> CustomParts:
    teacher = torch.Generator().manual_seed(12345)
    w_true = torch.randn(d_in, d_out, generator=teacher) / d_in**0.5

    def batch(step: int, batch_size: int, device: torch.device):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x = torch.randn(batch_size, d_in, generator=g)
        return x.to(device), torch.tanh(x @ w_true).to(device)

    def loss(model: nn.Module, b) -> torch.Tensor:
        x, y = b
        return F.mse_loss(model(x).float(), y)

    return CustomParts(
        model=ResidualMLP(d_in, width, depth, d_out),
        batch=batch,
        loss=loss,
        block_classes=(ResidualBlock,),
    )
