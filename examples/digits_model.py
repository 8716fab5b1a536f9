"""A small velocity model of the digits for ``floworacle analyze model``: train it, then study it.

    .venv/bin/python examples/digits_model.py                      # trains in under a minute on a CPU, writes digits_model.pt
    .venv/bin/floworacle analyze model --model examples/digits_model.py:model \\
        --dataset digits --holdout 0.2 --transition --json model.json --plot model.png

The model trains on the training part of the split ``--holdout 0.2`` (seed 0) makes, with the
conditional target x1 - x0 on the linear path (t = 0 noise), so the held-out digits are unseen.
Importing this module builds ``model`` and loads the weights from ``digits_model.pt`` in the
working directory (or the file ``FLOWORACLE_DIGITS_MODEL`` names).
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

WEIGHTS = Path(os.environ.get("FLOWORACLE_DIGITS_MODEL", "digits_model.pt"))


class VelocityMLP(nn.Module):
    """v(x_t, t): (B, 64), (B,) -> (B, 64); t enters through sinusoidal features."""

    def __init__(self, dim: int = 64, hidden: int = 256, freqs: int = 8) -> None:
        super().__init__()
        self.freqs: torch.Tensor
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(freqs, dtype=torch.float32) / 2)
        self.net = nn.Sequential(
            nn.Linear(dim + 2 * freqs, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f = t.to(x_t.dtype)[:, None] * self.freqs
        return self.net(torch.cat([x_t, f.sin(), f.cos()], dim=1))


model = VelocityMLP()
if WEIGHTS.is_file():
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
elif __name__ != "__main__":
    raise RuntimeError(f"{WEIGHTS} not found: train the model first with `python examples/digits_model.py`")


def train(steps: int, batch: int, lr: float, seed: int) -> None:
    """Train ``model`` on the training part of the digits' 20 % hold-out split (seed 0)."""
    from floworacle_server.data import load_digits, split_dataset

    train_set, _ = split_dataset(load_digits(), 0.2, 0)
    x = train_set.x
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.load_state_dict(VelocityMLP().state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
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
        if step % max(1, steps // 5) == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
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
