"""The real engine behind `pdserve profile`: `VllmStepTimer` times iterations of an
in-process vLLM engine (one `LLMEngine.step()` is one schedule + forward + sample + output
processing iteration), and the hardware description written into a profile. vLLM is
imported only inside `VllmStepTimer`.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from cluster.engine_args import engine_kwargs
from cluster.profile_grid import InputError, ProfileGrid, StepTimer

CPU_KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


@dataclass(frozen=True)
class EngineSettings:
    model_path: Path
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    block_size: int | None = None
    max_model_len: int | None = None
    kv_cache_gib: int = 1  # CPU backend: VLLM_CPU_KVCACHE_SPACE
    cpu_cores: str | None = None  # CPU backend: VLLM_CPU_OMP_THREADS_BIND, e.g. "0"
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 128
    seed: int = 0


@dataclass(frozen=True)
class EngineFacts:
    """What the started engine reports about itself."""

    kv_capacity_tokens: int  # KV blocks x block size
    block_size: int
    kv_dtype_bytes: int
    device: str  # hardware description


class ProfilingEngine(StepTimer, Protocol):
    """A StepTimer with a lifecycle: what `pdserve profile` drives (`VllmStepTimer`, or a fake)."""

    def start(self) -> EngineFacts: ...

    def warm_up(self, grid: ProfileGrid, rounds: int) -> None: ...

    def close(self) -> None: ...


class VllmStepTimer:
    """A StepTimer over an in-process vLLM engine: each `LLMEngine.step()` is one iteration."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self._engine = None
        self._rng = random.Random(settings.seed)
        self._vocab_size = 0
        self._next_id = 0

    def start(self) -> EngineFacts:
        s = self.settings
        # Read by vLLM at engine start: in-process engine core (so step() is one iteration),
        # and the CPU backend's KV space. This process exists to profile.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ[CPU_KV_SPACE_ENV] = str(s.kv_cache_gib)
        if s.cpu_cores is not None:
            # vLLM applies VLLM_CPU_OMP_THREADS_BIND only in its multiprocess executor; an
            # in-process engine would compute on every core of the host. So bind this whole
            # process (threads started later inherit it), which is what a serving instance's
            # worker gets: its cores and one compute thread per core.
            cores = parse_cores(s.cpu_cores)
            os.environ[CPU_BIND_ENV] = s.cpu_cores
            os.environ["OMP_NUM_THREADS"] = str(len(cores))
            os.sched_setaffinity(0, cores)
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        # The serving pools' builder (cluster.engine_args); prefix caching off so every
        # timed prefill computes its whole prompt.
        kwargs = engine_kwargs(s.model_path, tensor_parallel_size=s.tensor_parallel_size,
                               dtype=s.dtype, max_model_len=s.max_model_len, seed=s.seed,
                               block_size=s.block_size, max_num_batched_tokens=s.max_num_batched_tokens,
                               max_num_seqs=s.max_num_seqs, enable_prefix_caching=False,
                               disable_log_stats=True)
        self._engine = LLMEngine.from_engine_args(EngineArgs(**kwargs))
        config = self._engine.vllm_config
        self._vocab_size = config.model_config.get_vocab_size()
        cache = config.cache_config
        if cache.cache_dtype == "auto":
            kv_dtype_bytes = config.model_config.dtype.itemsize
        else:
            kv_dtype_bytes = 1 if str(cache.cache_dtype).startswith("fp8") else 2
        return EngineFacts(kv_capacity_tokens=int(cache.num_gpu_blocks or 0) * cache.block_size,
                           block_size=cache.block_size, kv_dtype_bytes=kv_dtype_bytes,
                           device=describe_hardware(s.cpu_cores))

    def close(self) -> None:
        self._engine = None  # the in-process engine shuts down with its last reference

    def _run(self, input_lens: Sequence[int], num_output_tokens: int) -> list[tuple[float, int]]:
        """Submit one batch, step until done: [(ms, requests that got a token)] per iteration."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        assert self._engine is not None, "start() first"
        params = SamplingParams(max_tokens=num_output_tokens, min_tokens=num_output_tokens,
                                ignore_eos=True, temperature=0.0, detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
        for length in input_lens:
            # Fresh random ids per request: no prefix can be shared between requests.
            ids = [self._rng.randrange(10, self._vocab_size) for _ in range(length)]
            self._next_id += 1
            self._engine.add_request(f"profile-{self._next_id}", TokensPrompt(prompt_token_ids=ids), params)
        steps = []
        while self._engine.has_unfinished_requests():
            start = time.perf_counter()
            outputs = self._engine.step()
            elapsed_ms = (time.perf_counter() - start) * 1000
            steps.append((elapsed_ms, sum(1 for o in outputs if o.outputs and o.outputs[0].token_ids)))
        return steps

    def time_prefill(self, input_lens: Sequence[int]) -> float:
        steps = self._run(input_lens, 1)
        if len(steps) != 1 or steps[0][1] != len(input_lens):
            raise RuntimeError(f"a prefill batch of {len(input_lens)} x {input_lens[0]} tokens took "
                               f"{len(steps)} iterations, not 1; raise --max-num-batched-tokens")
        return steps[0][0]

    def time_decode(self, batch_size: int, context_len: int, num_steps: int) -> list[float]:
        steps = self._run([context_len] * batch_size, num_steps + 1)
        # Iteration 1 is the prefill; keep decode iterations that advanced every request.
        return [ms for ms, advanced in steps[1:] if advanced == batch_size]

    def warm_up(self, grid: ProfileGrid, rounds: int) -> None:
        """Unrecorded iterations first: the first ones after start-up run slower."""
        shapes = grid.prefill_shapes()
        for _ in range(rounds):
            self.time_prefill(shapes[len(shapes) // 2])
            self.time_decode(max(grid.decode_batch_sizes), min(grid.decode_context_lens), 4)


def parse_cores(text: str) -> list[int]:
    """Core ids of a binding such as `0`, `0-3` or `0,2,4-5` (VLLM_CPU_OMP_THREADS_BIND's
    single-rank form)."""
    cores: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            cores.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise InputError(f"--cpu-cores {text!r}: give core ids like 0, 0-3 or 0,2") from None
    available = os.sched_getaffinity(0)
    if not cores or not cores <= available:
        raise InputError(f"--cpu-cores {text!r}: this process may use cores {sorted(available)}")
    return sorted(cores)


def describe_hardware(cpu_cores: str | None) -> str:
    """`NVIDIA H100 80GB HBM3`, or the CPU model and the cores the engine's threads use."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    model = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    num_cores = os.cpu_count() or 1
    if cpu_cores:
        return f"{model} (bound to cores {cpu_cores} of {num_cores})"
    return f"{model} ({num_cores} cores)"
