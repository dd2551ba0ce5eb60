"""One vLLM v1 async engine, as the prefill and decode workers both use it.

`EngineHost` builds `AsyncLLM` from pdserve's config for one instance, streams request
outputs as token-id deltas (detokenization and stop strings live in the router, as vLLM's
own front end does them), aborts requests, and keeps the engine's latest load figures
(running and waiting requests, KV usage, connector transfer records) from a stat logger.
vLLM is imported inside methods so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import reaper
from cluster.config import ModelConfig, PoolConfig
from cluster.cpu_affinity import renice, spawn_on
from cluster.engine_args import pool_engine_kwargs
from cluster.wire import SamplingSpec, TokenLogprob, TransferStat

# Memory-bounding defaults for CPU engines: vLLM sizes its KV cache from this.
_CPU_KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"
_CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


@dataclass
class EngineLoad:
    """Latest figures reported by the engine's scheduler (updated every engine step)."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    transfers: list[TransferStat] = field(default_factory=list)

    def take_transfers(self) -> tuple[TransferStat, ...]:
        taken, self.transfers = tuple(self.transfers), []
        return taken


def is_cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def device_total_bytes() -> int:
    """Memory of this process's GPU: what vLLM's gpu_memory_utilization is a share of."""
    import torch

    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to build one engine instance."""

    model_path: Path
    model: ModelConfig
    pool: PoolConfig
    instance_index: int  # within its pool, selects cpu_cores
    kv_transfer_config: dict[str, Any] | None = None
    # GPU memory the engine's KV connector allocates outside vLLM (a prefill's device staging
    # arena: ProducerService.engine_arena_bytes); on a GPU it comes out of the pool's
    # gpu_memory_utilization share (engine_args.engine_memory_utilization).
    device_arena_bytes: int = 0


def to_sampling_params(spec: SamplingSpec, *, max_tokens: int | None = None,
                       min_tokens: int | None = None, kv_transfer_params: dict | None = None):
    """vLLM's SamplingParams for `spec`: every SamplingSpec field reaches the engine (the
    router already refused what pdserve cannot honour)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
    structured = None
    if spec.structured is not None:
        c = spec.structured
        structured = StructuredOutputsParams(
            json=c.json, regex=c.regex, choice=list(c.choice) if c.choice is not None else None,
            grammar=c.grammar, json_object=c.json_object, structural_tag=c.structural_tag,
            disable_any_whitespace=c.disable_any_whitespace,
            disable_additional_properties=c.disable_additional_properties,
            whitespace_pattern=c.whitespace_pattern)
    return SamplingParams(
        n=1,
        max_tokens=spec.max_tokens if max_tokens is None else max_tokens,
        min_tokens=spec.min_tokens if min_tokens is None else min_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k if spec.top_k > 0 else 0,
        min_p=spec.min_p,
        seed=spec.seed,
        frequency_penalty=spec.frequency_penalty,
        presence_penalty=spec.presence_penalty,
        repetition_penalty=spec.repetition_penalty,
        logit_bias={tid: bias for tid, bias in spec.logit_bias} or None,
        allowed_token_ids=list(spec.allowed_token_ids) if spec.allowed_token_ids is not None else None,
        bad_words=list(spec.bad_words) or None,
        logprobs=spec.num_logprobs,
        structured_outputs=structured,
        ignore_eos=spec.ignore_eos,
        stop_token_ids=list(spec.stop_token_ids),
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        stream_interval=spec.stream_interval,
        extra_args=extra,
    )


def token_logprobs(completion, num_top: int) -> tuple[TokenLogprob, ...] | None:
    """The logprobs of a vLLM CompletionOutput's new tokens as wire structs (None when the
    request asked for none). Each position of vLLM's logprobs maps token id -> Logprob
    for the sampled token and the top `num_top` alternatives."""
    positions = completion.logprobs
    if positions is None:
        return None
    out = []
    for i, token_id in enumerate(completion.token_ids):
        position = positions[i]
        sampled = position[token_id]
        top = sorted(((tid, lp) for tid, lp in position.items()
                      if lp.rank is not None and 1 <= lp.rank <= max(num_top, 0)),
                     key=lambda item: item[1].rank)
        out.append(TokenLogprob(token_id=int(token_id), logprob=float(sampled.logprob),
                                rank=int(sampled.rank or 0),
                                top=tuple((int(tid), float(lp.logprob)) for tid, lp in top)))
    return tuple(out)


_ENGINE_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def engine_env(values: dict[str, str]):
    """`values` in os.environ while an engine starts, the previous values restored after.
    vLLM's CPU backend reads its settings from the environment of the processes it spawns
    (they copy os.environ when started, inside `AsyncLLM.from_engine_args`), so each engine
    sees its own settings and nothing leaks to the next one or to the caller. The lock
    orders engines started from several threads of one process."""
    with _ENGINE_ENV_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class EngineHost:
    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.load = EngineLoad()
        self.num_kv_blocks = 0
        self.block_size = 0  # tokens per KV block, known once the engine is up
        self._engine = None
        self._reaper: reaper.Reaper | None = None

    @property
    def is_ready(self) -> bool:
        return self._engine is not None

    def _engine_args(self):
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        on_gpu = is_cuda_available()
        arena = self.spec.device_arena_bytes if on_gpu else 0
        kwargs = pool_engine_kwargs(self.spec.model_path, self.spec.model, self.spec.pool,
                                    on_gpu=on_gpu, device_arena_bytes=arena,
                                    device_total_bytes=device_total_bytes() if arena else None)
        if self.spec.kv_transfer_config is not None:
            kwargs["kv_transfer_config"] = KVTransferConfig(**self.spec.kv_transfer_config)
        return AsyncEngineArgs(**kwargs)

    def _cpu_cores(self) -> list[int] | None:
        """This instance's CPU cores (None on a GPU, or when the pool does not pin them)."""
        pool = self.spec.pool
        if is_cuda_available() or pool.cpu_cores is None:
            return None
        return pool.cpu_cores[self.spec.instance_index]

    def _cpu_env(self) -> dict[str, str]:
        """What the CPU backend reads at start-up, in the engine processes AsyncLLM spawns."""
        if is_cuda_available():
            return {}
        env = {_CPU_KV_SPACE_ENV: str(self.spec.pool.kv_cache_gib)}
        cores = self._cpu_cores()
        if cores is not None:
            env[_CPU_BIND_ENV] = ",".join(str(c) for c in cores)
        return env

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        factory = _make_load_logger_factory(self)
        # Its lock also keeps other engines' processes out of the diff. spawn_on: the engine
        # may use its cores even where the front end is pinned elsewhere (cluster/cpu_affinity.py).
        with engine_env(self._cpu_env()), spawn_on(self._cpu_cores()):
            before = set(reaper.descendants(os.getpid()))
            self._engine = AsyncLLM.from_engine_args(self._engine_args(), stat_loggers=[factory])
            spawned = [p for p in reaper.descendants(os.getpid()) if p not in before]
        renice(spawned, self.spec.pool.cpu_nice)
        # The engine core does not outlive us by design, only by accident: see cluster/reaper.py.
        self._reaper = reaper.guard(spawned)
        cache = self._engine.vllm_config.cache_config
        self.num_kv_blocks = int(cache.num_gpu_blocks or 0)
        self.block_size = int(cache.block_size)

    async def stream(self, request_id: str, prompt_token_ids: list[int],
                     sampling_params) -> AsyncIterator[Any]:
        """Yield vLLM RequestOutputs (deltas). Cancelling the iterator aborts the request."""
        from vllm.inputs import TokensPrompt

        assert self._engine is not None, "engine not started"
        async for out in self._engine.generate(
            TokensPrompt(prompt_token_ids=list(prompt_token_ids)), sampling_params, request_id
        ):
            yield out

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    def shutdown(self) -> None:
        try:
            if self._engine is not None:
                self._engine.shutdown()
                self._engine = None
        finally:
            if self._reaper is not None:
                self._reaper.stop()
                self._reaper = None


def _make_load_logger_factory(host: EngineHost):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _LoadLogger(StatLoggerBase):
        """Copies the scheduler's figures into `host.load` on every engine step."""

        def __init__(self, vllm_config, engine_index: int = 0):
            self._load = host.load

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is None:
                return
            self._load.num_running_reqs = scheduler_stats.num_running_reqs
            self._load.num_waiting_reqs = scheduler_stats.num_waiting_reqs
            self._load.kv_cache_usage = scheduler_stats.kv_cache_usage
            connector = scheduler_stats.kv_connector_stats or {}
            for rec in connector.get("transfers", ()):
                self._load.transfers.append(TransferStat(**rec))
            del self._load.transfers[:-10_000]  # bounded if nobody polls

        def log_engine_initialized(self):
            pass

    return _LoadLogger
