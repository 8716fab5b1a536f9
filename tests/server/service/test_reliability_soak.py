"""A small, fast run of the load and soak script (benchmarks/soak.py) against an in-process server:
many concurrent SDK clients, mixed unary / streaming / nearest queries, every answer checked against
the script's float64 reference, only RESOURCE_EXHAUSTED allowed; and the reference itself checked
against the service tests' independent one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
from service_helpers import linear_coeffs, ref_oracle

_SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "soak.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("floworacle_soak", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


soak = _load_script()


def test_soak_reference_agrees_with_the_independent_one_and_catches_a_wrong_answer():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((50, 5))
    Y = rng.integers(0, 3, 50)
    t = np.array([0.1, 0.4, 0.7, 0.95])
    xt = t[:, None] * X[:4] + (1 - t[:, None]) * rng.standard_normal((4, 5))
    labels = np.array([0, -1, 2, 1])
    want = ref_oracle(X, xt, *linear_coeffs(t), data_labels=Y, labels=labels)["velocity"]
    got = soak.ref_velocity(X, Y, xt, t, labels, None, (0.0, 1.0))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # guided inside [0.3, 0.8] only: u + w (u(x|y) - u), else u(x|y)
    lab = np.array([0, 1, 2, 1])
    u = ref_oracle(X, xt, *linear_coeffs(t))["velocity"]
    uc = ref_oracle(X, xt, *linear_coeffs(t), data_labels=Y, labels=lab)["velocity"]
    inside = ((t >= 0.3) & (t <= 0.8))[:, None]
    guided = soak.ref_velocity(X, Y, xt, t, lab, 2.0, (0.3, 0.8))
    np.testing.assert_allclose(guided, np.where(inside, u + 2.0 * (uc - u), uc), rtol=1e-12, atol=1e-12)
    # the check flags an answer off by more than its wire dtype's rounding
    assert soak.max_rel(want * (1 + 1e-4), want) / soak.TOLERANCE["float32"] > 1
    assert soak.max_rel(want.astype(np.float32), want) / soak.TOLERANCE["float32"] <= 1
    bf = soak.to_bfloat16(np.array([1.0, 1.00390625, 1.01171875, -3.3], np.float32))
    assert bf.tolist() == [1.0, 1.0, 1.015625, -3.296875]  # round to nearest even on 8 mantissa bits


def test_small_soak_run_has_no_wrong_answer_and_only_intended_refusals():
    args = soak.parse_args(
        ["--requests", "200", "--clients", "16", "--in-process", "--n", "600", "--max-queue-requests", "4",
         "--max-inflight-rows", "32", "--time-limit", "120"]
    )  # fmt: skip
    report = soak.soak(args)
    assert report.requests == 200 and not report.timed_out
    assert report.wrong == 0 and report.unintended == 0, report.examples
    assert set(report.errors) <= {"RESOURCE_EXHAUSTED"}
    assert report.server_refusals > 0  # the small queue did refuse work ...
    assert report.answers_checked >= 150  # ... and most requests were answered and checked
    assert set(report.by_kind) == {"oracle", "stream", "nearest", "posterior_nearest"}
    assert report.ok
