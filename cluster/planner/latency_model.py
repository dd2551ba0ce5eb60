"""Iteration latency of one engine instance, in DistServe's profile format.

A profile file maps `model -> tensor-parallel degree -> LatencyProfile` (times in ms):

    {"facebook/opt-13b": {"1": {"prefill": [a, b, c],
                                 "decoding_smallbs": [a, b, c],
                                 "decoding_largebs": [a, b, c],
                                 "decoding_large_small_bs_threshold": 95,
                                 # optional, written by `pdserve profile`:
                                 "hardware": "A100-80GB",
                                 "kv_bytes_per_token": 819200,
                                 "kv_capacity_tokens": 66144}}}

- prefill of prompts with lengths l_i:       a + b*sum(l_i) + c*sum(l_i^2)
- decode step of B requests with contexts s_j: a + b*sum(s_j + 1) + c*B, with the
  small-batch coefficients when B < threshold and the large-batch ones otherwise.

Pipeline parallelism with p stages divides an iteration into p equal stages (DistServe's
model); `EngineTiming` turns a profile plus a stage count into the per-iteration seconds
the simulator consumes. Fitting coefficients from measurements lives in `profile_fit`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Coefficients = tuple[float, float, float]


class ProfileError(ValueError):
    """A latency profile that cannot be read or has no entry for the requested model/TP."""


class LatencyProfile(BaseModel):
    """Latency coefficients of one (model, hardware, tensor-parallel degree)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill: Coefficients = Field(
        description="[a, b, c]: prefill iteration ms = a + b*sum(l) + c*sum(l^2) over prompt lengths l."
    )
    decoding_smallbs: Coefficients = Field(
        description="[a, b, c]: decode step ms = a + b*sum(ctx+1) + c*B for batch size B < threshold."
    )
    decoding_largebs: Coefficients = Field(
        description="[a, b, c]: decode step ms for batch size B >= threshold."
    )
    decoding_large_small_bs_threshold: int = Field(
        95, ge=1, description="Batch size from which the large-batch decode coefficients apply."
    )
    hardware: str | None = Field(None, description="GPU the profile was measured on.")
    kv_bytes_per_token: int | None = Field(
        None, gt=0, description="KV-cache bytes one token occupies across the whole model."
    )
    kv_capacity_tokens: int | None = Field(
        None, ge=0, description="Measured KV-cache capacity of one instance (pipeline degree 1)."
    )
    whole_iterations: bool = Field(
        False, description="The coefficients time whole engine iterations, the engine's own "
        "scheduling and output processing included (`pdserve profile` times vLLM's "
        "`LLMEngine.step()`), so `engine.framework_overhead` is not added to them again. "
        "DistServe's published profiles time the model alone (false)."
    )

    def prefill_ms(self, input_lens: Iterable[int]) -> float:
        """One unpipelined prefill iteration over prompts of the given lengths."""
        lens = list(input_lens)
        a, b, c = self.prefill
        return a + b * sum(lens) + c * sum(l * l for l in lens)

    def decode_ms(self, context_lens: Iterable[int]) -> float:
        """One unpipelined decode step over requests with the given context lengths."""
        ctx = list(context_lens)
        batch_size = len(ctx)
        small = batch_size < self.decoding_large_small_bs_threshold
        a, b, c = self.decoding_smallbs if small else self.decoding_largebs
        return a + b * (sum(ctx) + batch_size) + c * batch_size


class ProfileTable:
    """All profiles of one file: `get(model, tp)` with errors that list what exists."""

    def __init__(self, entries: dict[str, dict[int, LatencyProfile]], source: str = "<memory>"):
        self._entries = entries
        self.source = source

    def models(self) -> list[str]:
        return sorted(self._entries)

    def tensor_parallel_sizes(self, model: str) -> list[int]:
        return sorted(self._entry(model))

    def get(self, model: str, tp: int) -> LatencyProfile:
        by_tp = self._entry(model)
        if tp not in by_tp:
            raise ProfileError(
                f"profile {self.source} has no tensor-parallel degree {tp} for {model!r} "
                f"(has {sorted(by_tp)})"
            )
        return by_tp[tp]

    def _entry(self, model: str) -> dict[int, LatencyProfile]:
        if model not in self._entries:
            raise ProfileError(
                f"profile {self.source} has no model {model!r} (has {self.models()})"
            )
        return self._entries[model]

    def to_json(self) -> dict:
        """The file format, metadata fields left out when unset."""
        return {
            model: {str(tp): p.model_dump(exclude_none=True) for tp, p in sorted(by_tp.items())}
            for model, by_tp in self._entries.items()
        }


def parse_profiles(data: object, source: str = "<memory>") -> ProfileTable:
    """Validate the decoded JSON of a profile file."""
    if not isinstance(data, dict) or not data:
        raise ProfileError(f"profile {source} must be a non-empty object {{model: {{tp: ...}}}}")
    entries: dict[str, dict[int, LatencyProfile]] = {}
    for model, by_tp in data.items():
        if not isinstance(by_tp, dict) or not by_tp:
            raise ProfileError(f"profile {source}: {model!r} must map TP degrees to coefficients")
        entries[model] = {}
        for tp_key, raw in by_tp.items():
            try:
                tp = int(tp_key)
            except ValueError:
                raise ProfileError(
                    f"profile {source}: {model!r} has key {tp_key!r}; keys must be TP degrees"
                ) from None
            if tp < 1:
                raise ProfileError(f"profile {source}: {model!r} has TP degree {tp} < 1")
            try:
                entries[model][tp] = LatencyProfile.model_validate(raw)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "(entry)"
                raise ProfileError(
                    f"profile {source}: {model!r} TP {tp}: {where}: {first['msg']}"
                ) from None
    return ProfileTable(entries, source)


def load_profiles(path: Path | str) -> ProfileTable:
    """Read a DistServe-format profile file (ours add optional metadata fields)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"profile file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read profile file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"profile file {path} is not valid JSON: {e}") from None
    return parse_profiles(data, str(path))


@dataclass(frozen=True)
class EngineTiming:
    """Seconds per iteration of one instance: a profile at one TP degree, split into
    `pipeline_parallel_size` equal stages.

    `framework_overhead` adds DistServe's per-iteration scheduling cost on the first stage,
    `2 + 0.0001 * sum(context tokens)` ms (the published profiles exclude it).
    `stage_fixed_cost`: `split` divides the whole iteration by the stage count (DistServe's
    model); `per_stage` divides only the token-dependent terms, and every stage pays the
    profile's fixed cost `a` (its kernel launches and scheduling do not shrink with fewer
    layers), which is what DistServe's real PP2 decode traces show.
    """


    profile: LatencyProfile
    pipeline_parallel_size: int = 1
    framework_overhead: bool = False
    stage_fixed_cost: Literal["per_stage", "split"] = "split"

    def __post_init__(self) -> None:
        if self.pipeline_parallel_size < 1:
            raise ValueError("pipeline_parallel_size must be >= 1")

    @property
    def adds_overhead(self) -> bool:
        """Whether iterations pay the framework overhead on top of the profile's times."""
        return self.framework_overhead and not self.profile.whole_iterations

    def _fixed_ms(self, a: float) -> float:
        """Fixed cost of one stage."""
        return a if self.stage_fixed_cost == "per_stage" else a / self.pipeline_parallel_size

    def prefill_stage_s(self, sum_lens: float, sum_sq_lens: float) -> tuple[float, float]:
        """(first stage, each later stage) seconds of one prefill batch."""
        a, b, c = self.profile.prefill
        stage = self._fixed_ms(a) + (b * sum_lens + c * sum_sq_lens) / self.pipeline_parallel_size
        first = stage + (2.0 + 1e-4 * sum_lens if self.adds_overhead else 0.0)
        return first / 1000.0, stage / 1000.0

    def prefill_coefficients_ms(self) -> tuple[float, float, float, bool]:
        """(fixed ms of one stage, b, c, adds overhead): `prefill_stage_s` for hot loops."""
        a, b, c = self.profile.prefill
        return self._fixed_ms(a), b, c, self.adds_overhead

    def prefill_latency_s(self, sum_lens: float, sum_sq_lens: float) -> float:
        """Start-to-finish seconds of one prefill batch through an idle pipeline."""
        first, later = self.prefill_stage_s(sum_lens, sum_sq_lens)
        return first + later * (self.pipeline_parallel_size - 1)

    def decode_step_s(self, batch_size: int, sum_context: float) -> float:
        """Seconds for one token of every request in a batch to pass all stages.

        Pipeline stages of a decode instance serve interleaved micro-batches (the simulator's
        lanes); one micro-batch still visits every stage per token, so its step takes the
        sum of stage times, i.e. the unpipelined time of that micro-batch.
        """
        p = self.profile
        small = batch_size < p.decoding_large_small_bs_threshold
        a, b, c = p.decoding_smallbs if small else p.decoding_largebs
        ms = self._fixed_ms(a) * self.pipeline_parallel_size + b * (sum_context + batch_size) + c * batch_size
        if self.adds_overhead:
            ms += 2.0 + 1e-4 * sum_context
        return ms / 1000.0

    def decode_coefficients_ms(self) -> tuple[int, Coefficients, Coefficients, float, float]:
        """(threshold, small, large, overhead a, overhead per context token) for hot loops."""
        p = self.profile
        oa, ob = (2.0, 1e-4) if self.adds_overhead else (0.0, 0.0)
        scale = self._fixed_ms(1.0) * self.pipeline_parallel_size  # fixed cost of all stages
        small = (p.decoding_smallbs[0] * scale,) + tuple(p.decoding_smallbs[1:])
        large = (p.decoding_largebs[0] * scale,) + tuple(p.decoding_largebs[1:])
        return p.decoding_large_small_bs_threshold, small, large, oa, ob

    def mixed_step_s(
        self, chunk_lens: list[int], chunk_prefix_lens: list[int], batch_size: int, sum_context: float
    ) -> float:
        """One chunked-prefill iteration: prompt chunks plus one token of `batch_size` decodes.

        A chunk of n new tokens after p already-computed ones costs b*n + c*(n^2 + 2*n*p),
        which sums to the unchunked b*l + c*l^2 over a whole prompt. The decode part adds its
        per-token terms; both parts share one fixed cost (one forward pass), the larger one.
        """
        if not chunk_lens:
            return self.decode_step_s(batch_size, sum_context)
        pa, pb, pc = self.profile.prefill
        new = sum(chunk_lens)
        quad = sum(n * n + 2 * n * p for n, p in zip(chunk_lens, chunk_prefix_lens))
        ms = pb * new + pc * quad
        fixed = pa
        if batch_size:
            small = batch_size < self.profile.decoding_large_small_bs_threshold
            da, db, dc = self.profile.decoding_smallbs if small else self.profile.decoding_largebs
            ms += db * (sum_context + batch_size) + dc * batch_size
            fixed = max(pa, da)
        ms += fixed
        if self.adds_overhead:
            ms += 2.0 + 1e-4 * (sum_context + new)
        return ms / 1000.0
