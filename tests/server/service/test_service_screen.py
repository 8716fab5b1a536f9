"""The screening-precision setting reaches the engine and answers stay exact."""

from __future__ import annotations

import grpc
import numpy as np
from service_helpers import linear_coeffs, max_rel, noisy_queries, oracle_request, ref_oracle

from floworacle import protocol
from floworacle.v1 import oracle_pb2_grpc as pb_grpc
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings, load_settings


def test_screen_setting_from_flags_and_environment() -> None:
    assert load_settings({}, env={}).screen == "float32"
    assert load_settings({"screen": "bfloat16"}, env={}).screen == "bfloat16"
    assert load_settings({}, env={"FLOWORACLE_SCREEN": "float16"}).screen == "float16"


def test_server_with_half_precision_screening_is_still_exact(digits) -> None:
    x, _ = digits
    t = np.array([0.05, 0.5, 0.9, 0.999])
    xt = noisy_queries(x, t, seed=5)
    settings = Settings(port=0, metrics_port=-1, screen="bfloat16")
    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        assert srv.server._servicer._oracle_runner.screen == "bfloat16"
        resp = pb_grpc.FlowOracleStub(ch).Oracle(oracle_request(xt, t, dtype="float64"), timeout=30)
    got = protocol.decode(resp.velocity)
    assert max_rel(got, ref_oracle(x, xt, *linear_coeffs(t))["velocity"]) < 1e-6
