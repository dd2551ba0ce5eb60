"""What every router module shares: the router's configuration, tokenizer, worker pool,
metrics, admission and the recent request traces (one `RouterDeps` per router)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from cluster.config import RouterConfig, SLOConfig
from router.admission import Admission
from router.handoff import RequestTrace
from router.metrics import Metrics
from router.pool import WorkerPool
from router.tokenizer import ModelTokenizer

MAX_TRACES = 10_000


@dataclass
class RouterDeps:
    config: RouterConfig
    slo: SLOConfig
    model_name: str
    tokenizer: ModelTokenizer
    pool: WorkerPool
    metrics: Metrics
    traces: collections.OrderedDict[str, RequestTrace] = field(default_factory=collections.OrderedDict)
    num_in_flight: int = 0
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.config, self.slo)

    def remember(self, trace: RequestTrace) -> None:
        self.traces[trace.request_id] = trace
        while len(self.traces) > MAX_TRACES:
            self.traces.popitem(last=False)
