"""The adapters' input dropout, with a cheaper mask on the CPU."""

from __future__ import annotations

import torch
from torch import nn


class LoraDropout(nn.Dropout):
    """nn.Dropout on the adapters' input, with a cheaper mask on the CPU.

    On the CPU torch's dropout draws one random number per element with `bernoulli_`. This draws 64 random
    bits per 4 elements instead (the mask costs a quarter) and keeps element i iff its 16-bit word
    u_i < round((1 - p) 2^16), so the keep rate is 1 - p up to 2^-17; kept elements are scaled by 1 / (1 - p),
    as nn.Dropout does. A training step of the forgetting study runs 1.02x (SLIM) to 1.09x (LoRA on all 7
    projections) faster (benchmarks/results/dropout_speed.md). Other devices, eval mode and p = 0 use
    nn.Dropout itself.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * dropout_noise(x.shape, self.p, x.dtype, x.device)


def dropout_noise(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device | None,
                  scale: float | None = None) -> torch.Tensor:
    """keep * scale (default 1 / (1 - p)), keep_i = [u_i < round((1 - p) 2^16)] with u_i uniform 16-bit
    words from the global RNG (see LoraDropout)."""
    return keep_noise(shape, p, device).to(dtype).mul_(1.0 / (1.0 - p) if scale is None else scale)


def keep_noise(shape: torch.Size, p: float, device: torch.device | None) -> torch.Tensor:
    """keep_i = [u_i < round((1 - p) 2^16)] as booleans, u_i uniform 16-bit words from the global RNG (64
    random bits per 4 elements)."""
    n = shape.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    u = words.view(torch.int16)[:n].view(shape)  # uniform on [-2^15, 2^15)
    return u < round((1.0 - p) * 65536) - 32768


def adapter_dropout(p: float) -> nn.Module:
    """The adapters' input dropout: `LoraDropout(p)`, or nn.Identity when p = 0."""
    return LoraDropout(p) if p > 0 else nn.Identity()
