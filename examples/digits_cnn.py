"""A small convolutional velocity model of the digits, beside the MLP of ``digits_model.py``.

    .venv/bin/python examples/digits_cnn.py                        # trains in about a minute on a CPU, writes digits_cnn.pt
    .venv/bin/floworacle analyze model --model examples/digits_cnn.py:model --dataset digits --holdout 0.2 \\
        --kinds all --patch-size 3 --kind-queries 32 --t-grid linspace:0.05:0.95:10 --json cnn.json --plot cnn.png

The network sees each sample as a 1 x 8 x 8 image: three 3 x 3 convolutions with zero padding
(a receptive field of 7 x 7 pixels, smaller than the image) and 1 x 1 convolutions, the time
entering every layer as a per-channel scale and shift. Kamb & Ganguli (2025) predict that such a
network follows the equivariant local oracle rather than the exact one; ``analyze model
--kinds`` measures which kind it is closest to per t. It trains like the MLP on the training part
of the 20 % hold-out split (seed 0) with the conditional target x1 - x0 on the linear path.
Importing this module builds ``model`` and loads ``digits_cnn.pt`` from the working directory
(or the file ``FLOWORACLE_DIGITS_CNN`` names).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(os.environ.get("FLOWORACLE_DIGITS_CNN", "digits_cnn.pt"))


class TimeConv(nn.Module):
    """A convolution followed by a time-dependent per-channel scale and shift and a SiLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, t_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
        self.film = nn.Linear(t_dim, 2 * c_out)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        return nn.functional.silu(self.conv(x) * (1 + scale) + shift)


class VelocityCNN(nn.Module):
    """v(x_t, t): (B, 64) or (B, 1, 8, 8), (B,) -> the same shape; receptive field 7 x 7."""

    def __init__(self, channels: int = 32, freqs: int = 8) -> None:
        super().__init__()
        self.freqs: torch.Tensor
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(freqs, dtype=torch.float32) / 2)
        t_dim = 2 * freqs
        self.layers = nn.ModuleList(
            [
                TimeConv(1, channels, 3, t_dim),
                TimeConv(channels, channels, 3, t_dim),
                TimeConv(channels, channels, 1, t_dim),
                TimeConv(channels, channels, 3, t_dim),
                TimeConv(channels, channels, 1, t_dim),
            ]
        )
        self.out = nn.Conv2d(channels, 1, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = x_t.shape
        h = x_t.reshape(shape[0], 1, 8, 8)
        f = t.to(h.dtype)[:, None] * self.freqs
        temb = torch.cat([f.sin(), f.cos()], dim=1)
        for layer in self.layers:
            h = layer(h, temb)
        return self.out(h).reshape(shape)


model = VelocityCNN()
if __name__ == "__main__":
    pass  # training starts from fresh weights
elif WEIGHTS.is_file():
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
else:
    raise RuntimeError(f"{WEIGHTS} not found: train the model first with `python examples/digits_cnn.py`")


def train(steps: int, batch: int, lr: float, seed: int) -> None:
    """Train ``model`` on the training part of the digits' 20 % hold-out split (seed 0)."""
    from floworacle_server.data import load_digits, split_dataset

    train_set, _ = split_dataset(load_digits(), 0.2, 0)
    x = train_set.x
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.load_state_dict(VelocityCNN().state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x1 = x[torch.randint(0, x.shape[0], (batch,), generator=g)]
        x0 = torch.randn(x1.shape, generator=g)
        t = torch.rand(batch, generator=g) * 0.99
        x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
        loss = (model(x_t, t) - (x1 - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=WEIGHTS, help=f"where to write the weights (default {WEIGHTS})")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a small model: one thread avoids OpenMP spin-waits on a busy machine
    train(args.steps, args.batch, args.lr, args.seed)
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
