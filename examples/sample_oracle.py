"""Draw samples from the exact oracle of a served data set by integrating its velocity from noise.

    .venv/bin/python examples/sample_oracle.py --address localhost:50051 --n 64 --out generated.npy
    .venv/bin/floworacle analyze memorization --samples generated.npy --dataset digits

The exact oracle is the flow of the training set itself: late in the path its posterior collapses
onto one training sample, so (almost) every sample it generates is a copy of a training sample;
the memorisation report counts them (d1/d2 < 1/3). A model that generalises does not do that.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from floworacle import OracleClient
from floworacle.sampling import METHODS, integrate


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default="localhost:50051", help="a running server (default localhost:50051)")
    p.add_argument("--dataset", default=None, help="data set name (default: the server's default)")
    p.add_argument("--n", type=int, default=64, help="samples to draw (default 64)")
    p.add_argument("--steps", type=int, default=50, help="ODE steps (default 50)")
    p.add_argument("--method", choices=METHODS, default="midpoint", help="solver (default midpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="generated.npy", help="where to write the (n, *sample_shape) samples")
    args = p.parse_args(argv)
    with OracleClient(args.address, dataset=args.dataset) as client:
        info = client.describe()
        x0 = np.random.default_rng(args.seed).standard_normal((args.n, *info.sample_shape))
        samples = integrate(lambda x, t: client.velocity(x, t), x0, steps=args.steps, method=args.method)
    np.save(args.out, samples.astype(np.float32))
    print(
        f"wrote {args.out}: {args.n} samples of {info.name!r} {list(info.sample_shape)} ({args.steps} {args.method} steps)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
