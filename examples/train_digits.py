"""Train a tiny flow-matching network on the 8x8 digits against a running Flow Oracle server.

    floworacle serve                      # in one terminal: serves the embedded digits
    python examples/train_digits.py       # in another (or --address HOST:PORT)

The training data are the same 1,797 digits the server holds (scaled to [-1, 1]); for each batch
the SDK's prefetcher draws t and noise x0, forms x_t = t x1 + (1 - t) x0 and asks the server for
the exact marginal velocity at x_t while the previous batch trains. At the end the script prints,
per t bucket, the model's loss against the oracle target and against the conditional target
x1 - x0 (whose variance the oracle removes), beside the floor of the latter: the oracle's own
loss against the conditional target.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from floworacle import OracleClient
from floworacle.training import OraclePrefetcher, conditional_target, oracle_loss, per_sample_mse, sample_x_t


def load_digits_locally() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 64) float32 digits in [-1, 1] (pixel / 8 - 1, as the server scales them) and labels."""
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.data.astype(np.float32) / 8.0 - 1.0), d.target.astype(np.int64)
    except ImportError:  # the server package ships the same images
        from floworacle_server.data._digits import digits_arrays

        return digits_arrays()


class VelocityMLP(nn.Module):
    """v_theta(x_t, t): (B, 64), (B,) -> (B, 64); t enters through sinusoidal features."""

    def __init__(self, dim: int = 64, hidden: int = 256, freqs: int = 8) -> None:
        super().__init__()
        self.freqs: torch.Tensor
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(freqs, dtype=torch.float32))
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
        angles = t[:, None] * self.freqs[None, :]
        return self.net(torch.cat([x_t, torch.sin(angles), torch.cos(angles)], dim=1))


def batches(x: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of x1."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            yield x[perm[i : i + batch]]


def evaluate(
    model: nn.Module, client: OracleClient, x: torch.Tensor, buckets: int, per_bucket: int, seed: int
) -> list[tuple[float, float, float, float]]:
    """Per t bucket [k / buckets, (k + 1) / buckets): (t_mid, loss vs oracle, loss vs
    conditional, oracle vs conditional), each a mean squared error per dimension."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    model.eval()
    with torch.no_grad():
        for k in range(buckets):
            lo, hi = k / buckets, min((k + 1) / buckets, 0.9999)
            x1 = x[torch.randint(len(x), (per_bucket,), generator=g)]
            t = lo + (hi - lo) * torch.rand(per_bucket, generator=g, dtype=torch.float64)
            x_t, x0 = sample_x_t(x1, t, generator=g)
            oracle = client.velocity(x_t, t)
            cond = conditional_target(x1, x0, t)
            pred = model(x_t, t.float())
            rows.append(
                (
                    (lo + hi) / 2,
                    per_sample_mse(pred, oracle).mean().item(),
                    per_sample_mse(pred, cond).mean().item(),
                    per_sample_mse(oracle, cond).mean().item(),
                )
            )
    model.train()
    return rows


def print_table(rows: Sequence[tuple[float, float, float, float]], title: str) -> None:
    print(title)
    print(f"  {'t bucket':>9}  {'vs oracle':>10}  {'vs x1-x0':>10}  {'floor':>10}")
    for mid, lo, lc, floor in rows:
        print(f"  {mid:9.2f}  {lo:10.4f}  {lc:10.4f}  {floor:10.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--address", default="localhost:50051", help="server address (default localhost:50051)")
    p.add_argument("--dataset", default="digits", help="data set name on the server (default digits)")
    p.add_argument("--steps", type=int, default=1500, help="training steps (default 1500, about a minute on a CPU)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--switch",
        type=float,
        default=None,
        help="oracle target for t < switch, x1 - x0 above (default: oracle everywhere)",
    )
    p.add_argument("--wire-dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--buckets", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=256, help="queries per t bucket in the evaluation")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    x_np, _ = load_digits_locally()
    x = torch.from_numpy(x_np)
    with OracleClient(args.address, dataset=args.dataset, wire_dtype=args.wire_dtype, timeout=30) as client:
        info = client.describe(args.dataset)
        print(
            f"server data set {info.name!r}: N = {info.num_samples}, shape {info.sample_shape}, {info.fingerprint[:19]}..."
        )
        if info.dim != x.shape[1] or info.num_samples != x.shape[0]:
            print(
                "warning: the server holds other data than the local digits; the oracle targets will not match",
                file=sys.stderr,
            )
        model = VelocityMLP(dim=x.shape[1])
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        print_table(
            evaluate(model, client, x, args.buckets, args.eval_size, args.seed + 1),
            "before training (MSE per dimension):",
        )
        start = time.perf_counter()
        source = itertools.islice(batches(x, args.batch, args.seed), args.steps)
        with OraclePrefetcher(client, source, lookahead=2, seed=args.seed) as stream:
            for step, b in enumerate(stream, 1):
                loss = oracle_loss(model(b.x_t, b.t), b, switch=args.switch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step % max(1, args.steps // 5) == 0 or step == args.steps:
                    print(f"step {step:5d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)")
        print_table(
            evaluate(model, client, x, args.buckets, args.eval_size, args.seed + 1),
            "after training (MSE per dimension):",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
