"""Analysis tools: the navigation-to-refinement transition, sampling advice, memorisation reports,
the in-process side of the model study (:mod:`floworacle.study`), and the oracle kinds side by side."""

from floworacle_server.analysis._advice import (
    Advice,
    advise,
    format_advice_table,
    share_before,
    shift_for_share,
    shifted_time,
)
from floworacle_server.analysis._kinds import KindSamples, kind_velocity, kinds_json, plot_kind_grid, sample_kinds
from floworacle_server.analysis._memorization import (
    DEFAULT_THRESHOLD,
    MemorizationReport,
    image_shape_for,
    load_samples,
    memorization_report,
)
from floworacle_server.analysis._model import EngineData, load_model
from floworacle_server.analysis._transition import (
    DEFAULT_T_GRID,
    METRICS,
    Evaluation,
    Evaluator,
    QuerySet,
    TransitionCurve,
    client_evaluator,
    engine_evaluator,
    make_queries,
    parse_t_grid,
    switch_time,
    synthetic_dataset,
    transition_curve,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_T_GRID",
    "METRICS",
    "Advice",
    "EngineData",
    "Evaluation",
    "Evaluator",
    "KindSamples",
    "MemorizationReport",
    "QuerySet",
    "TransitionCurve",
    "advise",
    "client_evaluator",
    "engine_evaluator",
    "format_advice_table",
    "image_shape_for",
    "kind_velocity",
    "kinds_json",
    "load_model",
    "load_samples",
    "make_queries",
    "memorization_report",
    "parse_t_grid",
    "plot_kind_grid",
    "sample_kinds",
    "share_before",
    "shift_for_share",
    "shifted_time",
    "switch_time",
    "synthetic_dataset",
    "transition_curve",
]
