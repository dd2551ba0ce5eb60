"""What the load generator observed about each request, as plain frozen data.

A request's client-side lifecycle; only terminal outcomes are recorded:

    scheduled ──send──▶ sent ──first token──▶ streaming ──[DONE]──▶ OK
                         │                        │
                         └───────────┬────────────┘
                                     ├─▶ HTTP_ERROR        status != 200
                                     ├─▶ SERVER_ERROR      error event, malformed or tokenless stream
                                     ├─▶ CONNECTION_ERROR  connect or read failure
                                     ├─▶ TIMEOUT           the request timeout passed
                                     └─▶ NOT_FINISHED      still running at the run's drain deadline

A request whose send time falls after the run's duration bound is never sent and has no
record. All times are seconds; `scheduled_s` and `sent_s` count from the run start, the
latencies from the moment the request was sent.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


class RequestOutcome(str, enum.Enum):
    OK = "ok"
    HTTP_ERROR = "http_error"
    SERVER_ERROR = "server_error"
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"
    NOT_FINISHED = "not_finished"


@dataclass(frozen=True)
class RequestRecord:
    index: int
    input_len: int  # prompt tokens sent (special tokens included)
    output_len: int  # output tokens asked for
    scheduled_s: float
    sent_s: float | None
    outcome: RequestOutcome
    ttft_s: float | None = None  # send -> first token-bearing chunk
    e2e_s: float | None = None  # send -> last token-bearing chunk
    num_output_tokens: int = 0  # from the usage chunk; chunk count when there is none
    num_prompt_tokens: int | None = None  # as the server counted them (usage)
    num_chunks: int = 0  # token-bearing SSE chunks
    # Inter-token gaps, len == num_output_tokens - 1 when usage and chunks agree;
    # several tokens in one chunk share that chunk's gap (see bench.loadgen).
    itl_s: tuple[float, ...] = ()
    error: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.outcome is RequestOutcome.OK

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["outcome"] = self.outcome.value
        data["itl_s"] = list(self.itl_s)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RequestRecord":
        fields = dict(data)
        fields["outcome"] = RequestOutcome(fields["outcome"])
        fields["itl_s"] = tuple(fields.get("itl_s", ()))
        return cls(**fields)


@dataclass(frozen=True)
class RunRecords:
    """Everything one load-generator run observed."""

    records: tuple[RequestRecord, ...]
    rate_rps: float | None  # offered rate; None for a trace replayed at its own speed
    wall_time_s: float  # run start -> last request finished (or abandoned)
    num_not_sent: int = 0  # requests cut off by the duration bound
