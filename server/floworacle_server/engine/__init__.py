"""The oracle engine: streamed exact posterior means and nearest samples over a resident data set.

It takes the protocol's queries as they are (:class:`floworacle.protocol.OracleQuery`,
:class:`~floworacle.protocol.NearestQuery`; torch at its entry) and reads the data set's facts
(:attr:`floworacle_server.data.Dataset.stats`). Rooms: ``_bounds`` (the one rounding-error model),
``_config`` (per-device block sizes), ``_batch`` (per-batch state, immutable), ``_screen``
(screening GEMM and candidates), ``_refine`` (float64 logits from differences), ``_dense`` (dense
float64 and fast passes), ``_partials`` (mergeable sums), ``_passes`` (routing), ``_assemble``
(the outputs), ``_merge`` (merging partials through collectives: the hook a gang plugs into),
``_space`` / ``_knn`` / ``_ann`` / ``_nearest`` / ``_backend`` (nearest samples), ``_index_build``
(faiss indexes), ``_flush`` (flush-to-zero), ``_diagnostics`` (the entropy's and ESS's bounds),
``_knn_target`` (the sublinear nearest-neighbour estimate); the oracles that generalise:
``_patches`` (what the patch oracles share), ``_local`` (local oracle and the patch pass),
``_equivariant`` (equivariant local), ``_linear`` (Gaussian / Wiener), ``_kinds`` (one entry
point for every kind and the outputs).
"""

from floworacle.protocol import Guidance, NearestQuery, OracleQuery
from floworacle_server.engine._assemble import SlotMerge, compute_partials, global_oracle
from floworacle_server.engine._backend import (
    NEAREST_BACKENDS,
    NearestInfo,
    calibrate_nearest_backends,
    choose_backend,
    nearest_info,
)
from floworacle_server.engine._bounds import DENSE_LOGIT_TOL, REACH_MARGIN, SCREEN_DTYPES
from floworacle_server.engine._config import CPU, CUDA, EngineConfig
from floworacle_server.engine._equivariant import equivariant_oracle
from floworacle_server.engine._flush import FlushState, flush_denormals
from floworacle_server.engine._index_build import IndexSpec, build_nearest_index, parse_index_spec
from floworacle_server.engine._kinds import KINDS, PATCH_KINDS, kind_oracle, kind_x1, oracle, patch_schedule
from floworacle_server.engine._knn_target import KnnOracleResult, KnnTarget, knn_oracle, knn_target
from floworacle_server.engine._linear import linear_oracle
from floworacle_server.engine._local import local_oracle
from floworacle_server.engine._merge import Collective, CollectiveMerge
from floworacle_server.engine._nearest import merge_nearest, nearest, posterior_nearest, ranking_keys, search
from floworacle_server.engine._partials import Partials, Posterior
from floworacle_server.engine._patches import PatchConfig, PatchResult, check_patch_size, max_patch_size
from floworacle_server.engine._types import NearestResult, OracleResult, outputs_from_x1

__all__ = [
    "CPU",
    "CUDA",
    "DENSE_LOGIT_TOL",
    "KINDS",
    "NEAREST_BACKENDS",
    "PATCH_KINDS",
    "REACH_MARGIN",
    "SCREEN_DTYPES",
    "Collective",
    "CollectiveMerge",
    "EngineConfig",
    "FlushState",
    "Guidance",
    "IndexSpec",
    "KnnOracleResult",
    "KnnTarget",
    "NearestInfo",
    "NearestQuery",
    "NearestResult",
    "OracleQuery",
    "OracleResult",
    "PatchConfig",
    "PatchResult",
    "Partials",
    "Posterior",
    "SlotMerge",
    "build_nearest_index",
    "calibrate_nearest_backends",
    "check_patch_size",
    "choose_backend",
    "compute_partials",
    "equivariant_oracle",
    "flush_denormals",
    "global_oracle",
    "kind_oracle",
    "kind_x1",
    "knn_oracle",
    "knn_target",
    "linear_oracle",
    "local_oracle",
    "max_patch_size",
    "merge_nearest",
    "nearest",
    "nearest_info",
    "oracle",
    "outputs_from_x1",
    "parse_index_spec",
    "patch_schedule",
    "posterior_nearest",
    "ranking_keys",
    "search",
]
