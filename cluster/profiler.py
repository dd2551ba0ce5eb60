"""`pdserve profile`: time the real engine on this hardware and fit the planner's latency model.

    ProfileGrid ──batch shapes──▶ StepTimer ──ms per iteration──▶ measure_grid ──samples──▶
        fit_profile (cluster.planner.profile_fit) ──▶ {model: {tp: entry}} JSON + fit report

- **Prefill shape** `(l_1, ..., l_B)`: B prompts submitted together with `max_tokens=1`; the
  engine runs them as ONE iteration (the token budget is raised to hold the largest batch,
  and a batch that still splits is an error).
- **Decode shape** `(B, C)`: B prompts of C tokens with `ignore_eos` and `decode_steps + 1`
  output tokens. Iteration 1 is their prefill (not a decode sample); iteration k+1 is a pure
  decode step with `C + k - 1` tokens already in KV per request. A run's time is its median
  step, at that step's context. A step that did not advance all B requests by one token
  (e.g. a split prefill) is dropped.
- Every shape runs `repeats` times, in rounds over the whole grid (a burst of load from
  another process hits one round of many shapes, not every run of one shape), and keeps
  its fastest run (`measure_grid`).

`VllmStepTimer` times iterations by calling `LLMEngine.step()` of an in-process vLLM engine
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`): one call is exactly one schedule + forward + sample +
output-processing iteration, the cost a serving engine pays per step. IPC between the
serving front end and its engine core is therefore not in the profile (see docs/planner.md).
With `--cpu-cores` the whole process is bound to those cores with one compute thread per
core, as a serving instance's worker is (vLLM itself binds only multiprocess workers).
Tests inject any `StepTimer` (no engine). vLLM is imported only inside `VllmStepTimer`.

Exit codes: 0 profile written; 1 the engine or the fit failed; 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from cluster.engine_args import engine_kwargs
from cluster.planner.latency_model import LatencyProfile
from cluster.planner.model_shape import ModelShapeError, load_model_shape
from cluster.planner.profile_fit import DecodeSample, PrefillSample, fit_profile, profile_document

_CPU_KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"
_CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


class InputError(ValueError):
    """Profiler input that cannot be used; the message is one line."""


# --------------------------------------------------------------------------------- the grid

@dataclass(frozen=True)
class ProfileGrid:
    """Which batch shapes to time. Shapes above the token caps are skipped."""

    prefill_lens: tuple[int, ...] = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048)
    prefill_batch_sizes: tuple[int, ...] = (1, 2, 4)
    prefill_max_batch_tokens: int = 4096  # the serving prefill budget: larger batches split
    decode_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode_context_lens: tuple[int, ...] = (128, 512, 1024, 2048)
    decode_max_batch_tokens: int = 16384  # each decode shape first prefills B*C tokens
    decode_steps: int = 16
    repeats: int = 3

    def validate(self) -> None:
        for name in ("prefill_lens", "prefill_batch_sizes", "decode_batch_sizes", "decode_context_lens"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise InputError(f"--{name.replace('_', '-')} needs positive integers, got {list(values)}")
        for name in ("prefill_max_batch_tokens", "decode_max_batch_tokens", "decode_steps", "repeats"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if len(self.prefill_shapes()) < 3:
            raise InputError("the prefill grid has fewer than 3 shapes under --prefill-max-batch-tokens; "
                             "a fit of 3 coefficients needs more")
        if len(self.decode_shapes()) < 3:
            raise InputError("the decode grid has fewer than 3 shapes under --decode-max-batch-tokens; "
                             "a fit of 3 coefficients needs more")

    def prefill_shapes(self) -> list[tuple[int, ...]]:
        """Prompt lengths of each prefill batch (equal lengths within a batch)."""
        return [(length,) * batch for length in sorted(set(self.prefill_lens))
                for batch in sorted(set(self.prefill_batch_sizes))
                if length * batch <= self.prefill_max_batch_tokens]

    def decode_shapes(self) -> list[tuple[int, int]]:
        """(batch size, prompt length) of each decode point."""
        return [(batch, context) for batch in sorted(set(self.decode_batch_sizes))
                for context in sorted(set(self.decode_context_lens))
                if batch * context <= self.decode_max_batch_tokens]

    def max_context(self) -> int:
        """Longest prompt + output of any request the grid submits."""
        return max(max(self.prefill_lens) + 1,
                   max(c for _, c in self.decode_shapes()) + self.decode_steps + 1)


class StepTimer(Protocol):
    """Times engine iterations of given shapes (the real engine, or a test's function)."""

    def time_prefill(self, input_lens: Sequence[int]) -> float:
        """Milliseconds of ONE prefill iteration over prompts of these lengths."""
        ...

    def time_decode(self, batch_size: int, context_len: int, num_steps: int) -> list[float]:
        """Milliseconds of each of `num_steps` decode steps of `batch_size` requests whose
        prompts have `context_len` tokens; step k (0-based) has `context_len + k` tokens in KV."""
        ...


# ------------------------------------------------------------------- measuring and fitting

@dataclass(frozen=True)
class Measurements:
    prefill: list[PrefillSample]
    decode: list[DecodeSample]
    prefill_runs_ms: list[list[float]]  # [shape] -> every repeat's time, aligned with `prefill`
    decode_runs_ms: list[list[float]]  # [shape] -> every repeat's median step, aligned with `decode`


def measure_grid(grid: ProfileGrid, timer: StepTimer,
                 progress: Callable[[str], None] = lambda _: None) -> Measurements:
    """One sample per grid shape: the fastest of `repeats` runs.

    The minimum, not the mean: on a shared host, other processes only ever add time to an
    iteration, so the fastest run is the closest to the engine's own cost (timeit's rule).
    Within a decode run the median step is taken first (a burst rarely covers a whole run).
    """
    prefill_shapes, decode_shapes = grid.prefill_shapes(), grid.decode_shapes()
    prefill_runs: dict[tuple[int, ...], list[float]] = {s: [] for s in prefill_shapes}
    decode_runs: dict[tuple[int, int], list[tuple[float, int]]] = {s: [] for s in decode_shapes}
    for round_index in range(grid.repeats):
        for lens in prefill_shapes:
            prefill_runs[lens].append(timer.time_prefill(lens))
        for batch, context in decode_shapes:
            steps = timer.time_decode(batch, context, grid.decode_steps)
            if steps:  # (median step ms, its index: the context grew by that many tokens)
                median_ms = statistics.median_low(steps)
                decode_runs[(batch, context)].append((median_ms, steps.index(median_ms)))
        progress(f"round {round_index + 1}/{grid.repeats}: {len(prefill_shapes)} prefill shapes, "
                 f"{len(decode_shapes)} decode points")
    prefill = [PrefillSample(lens, min(prefill_runs[lens])) for lens in prefill_shapes]
    decode, decode_runs_ms = [], []
    for (batch, context), runs in decode_runs.items():
        if not runs:
            progress(f"decode B={batch} C={context}: no clean decode step in any run, skipped")
            continue
        ms, middle = min(runs)
        decode.append(DecodeSample((context + middle,) * batch, ms))
        decode_runs_ms.append([m for m, _ in runs])
    return Measurements(prefill, decode, [prefill_runs[s] for s in prefill_shapes], decode_runs_ms)


@dataclass(frozen=True)
class FitQuality:
    """How well one fitted formula explains its samples."""

    r_squared: float
    mean_abs_error_pct: float
    max_abs_error_pct: float
    rows: tuple[tuple[str, float, float], ...]  # (shape, measured ms, predicted ms)


def fit_quality(labels_measured_predicted: list[tuple[str, float, float]]) -> FitQuality:
    measured = [m for _, m, _ in labels_measured_predicted]
    mean = sum(measured) / len(measured)
    total = sum((m - mean) ** 2 for m in measured)
    residual = sum((m - p) ** 2 for _, m, p in labels_measured_predicted)
    errors = [abs(p - m) / m * 100 if m > 0 else 0.0 for _, m, p in labels_measured_predicted]
    return FitQuality(r_squared=1 - residual / total if total > 0 else 1.0,
                      mean_abs_error_pct=sum(errors) / len(errors), max_abs_error_pct=max(errors),
                      rows=tuple(labels_measured_predicted))


def assess_fit(entry: dict, data: Measurements) -> tuple[FitQuality, FitQuality]:
    """(prefill, decode) fit quality of a fitted entry against the samples it came from."""
    profile = LatencyProfile.model_validate(entry)
    prefill = [(f"{len(s.input_lens)} x {s.input_lens[0]}", s.time_ms, profile.prefill_ms(s.input_lens))
               for s in data.prefill]
    decode = [(f"B={len(s.context_lens)} ctx={s.context_lens[0]}", s.time_ms,
               profile.decode_ms(s.context_lens)) for s in data.decode]
    return fit_quality(prefill), fit_quality(decode)


def _slowest_vs_fastest(runs_ms: list[float]) -> str:
    return f"{max(runs_ms) / min(runs_ms):.2f}x" if min(runs_ms) > 0 else "-"


def render_fit_report(entry: dict, quality: tuple[FitQuality, FitQuality], data: Measurements) -> str:
    """Coefficients, R^2 and residuals per formula, and every shape: measured (fastest run),
    fitted, error, and slowest/fastest run (how much interference the runs saw)."""
    lines = []
    for name, q, coefficients, formula, runs in (
        ("prefill", quality[0], entry["prefill"], "a + b*sum(l) + c*sum(l^2)", data.prefill_runs_ms),
        ("decode", quality[1], entry["decoding_smallbs"], "a + b*sum(ctx+1) + c*B", data.decode_runs_ms),
    ):
        a, b, c = coefficients
        lines.append(f"{name}: ms = {formula}, a={a:.4g} b={b:.4g} c={c:.4g}")
        lines.append(f"  R^2 {q.r_squared:.4f}; |residual| mean {q.mean_abs_error_pct:.1f}%, "
                     f"max {q.max_abs_error_pct:.1f}% over {len(q.rows)} shapes")
        lines.append(f"  {'shape':<18} {'measured ms':>12} {'fit ms':>10} {'error':>8} {'runs max/min':>13}")
        for (label, measured, predicted), shape_runs in zip(q.rows, runs):
            error = (predicted - measured) / measured * 100 if measured > 0 else 0.0
            lines.append(f"  {label:<18} {measured:>12.2f} {predicted:>10.2f} {error:>+7.1f}% "
                         f"{_slowest_vs_fastest(shape_runs):>13}")
    return "\n".join(lines)


# ------------------------------------------------------------------------- the real engine

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
        os.environ[_CPU_KV_SPACE_ENV] = str(s.kv_cache_gib)
        if s.cpu_cores is not None:
            # vLLM applies VLLM_CPU_OMP_THREADS_BIND only in its multiprocess executor; an
            # in-process engine would compute on every core of the host. So bind this whole
            # process (threads started later inherit it), which is what a serving instance's
            # worker gets: its cores and one compute thread per core.
            cores = parse_cores(s.cpu_cores)
            os.environ[_CPU_BIND_ENV] = s.cpu_cores
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


# ------------------------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ProfileGrid()
    a = parser.add_argument
    g = parser.add_argument_group("model and engine")
    model = g.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, help="local Hugging Face model directory")
    model.add_argument("--embedded-model", choices=["tiny", "small"],
                       help="embedded model (default tiny when --model is not given)")
    g.add_argument("--name", help="model key in the profile (default: the directory name, or "
                   "pdserve-tiny / pdserve-small)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="TP degree (the profile's key)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--block-size", type=int, help="KV block size (CPU: a multiple of 32; default vLLM's)")
    g.add_argument("--max-model-len", type=int, help="engine context length (default: enough for the grid)")
    g.add_argument("--kv-cache-gib", type=int, default=1,
                   help="CPU backend: KV-cache space in GiB (VLLM_CPU_KVCACHE_SPACE); use the "
                   "serving pools' kv_cache_gib so the measured capacity matches")
    g.add_argument("--cpu-cores", help="CPU backend: cores the engine's threads are bound to, "
                   "e.g. 0 or 0-3 (VLLM_CPU_OMP_THREADS_BIND; default: that variable, else vLLM's)")
    g = parser.add_argument_group("grid")
    g.add_argument("--prefill-lens", type=int, nargs="+", default=list(d.prefill_lens))
    g.add_argument("--prefill-batch-sizes", type=int, nargs="+", default=list(d.prefill_batch_sizes))
    g.add_argument("--prefill-max-batch-tokens", type=int, default=d.prefill_max_batch_tokens,
                   help="skip prefill batches with more prompt tokens (the serving prefill budget)")
    g.add_argument("--decode-batch-sizes", type=int, nargs="+", default=list(d.decode_batch_sizes))
    g.add_argument("--decode-context-lens", type=int, nargs="+", default=list(d.decode_context_lens))
    g.add_argument("--decode-max-batch-tokens", type=int, default=d.decode_max_batch_tokens,
                   help="skip decode points whose batch holds more context tokens")
    g.add_argument("--decode-steps", type=int, default=d.decode_steps, help="decode steps timed per point")
    g.add_argument("--repeats", type=int, default=d.repeats,
                   help="rounds over the whole grid; each shape keeps its fastest run")
    g.add_argument("--warmup", type=int, default=2, help="unrecorded warm-up rounds")
    g.add_argument("--threshold", type=int, default=95,
                   help="batch size from which decode uses the large-batch coefficients")
    g = parser.add_argument_group("output")
    g.add_argument("--output", "-o", type=Path, help="profile JSON to write (default: print it)")
    g.add_argument("--samples-output", type=Path,
                   help="also write the measured samples (input of fit_profile) as JSON")


def _grid_from_args(args: argparse.Namespace) -> ProfileGrid:
    grid = ProfileGrid(
        prefill_lens=tuple(args.prefill_lens), prefill_batch_sizes=tuple(args.prefill_batch_sizes),
        prefill_max_batch_tokens=args.prefill_max_batch_tokens,
        decode_batch_sizes=tuple(args.decode_batch_sizes),
        decode_context_lens=tuple(args.decode_context_lens),
        decode_max_batch_tokens=args.decode_max_batch_tokens, decode_steps=args.decode_steps,
        repeats=args.repeats)
    grid.validate()
    return grid


def _model_from_args(args: argparse.Namespace) -> tuple[Path, str]:
    if args.model is not None:
        path = Path(args.model).expanduser()
        if not (path / "config.json").is_file():
            raise InputError(f"--model {path} is not a Hugging Face model directory (no config.json)")
        return path, args.name or path.resolve().name
    from cluster.tiny_model import ensure_tiny_model

    preset = args.embedded_model or "tiny"
    return ensure_tiny_model(preset), args.name or f"pdserve-{preset}"


def _settings_from_args(args: argparse.Namespace, model_path: Path, grid: ProfileGrid) -> EngineSettings:
    if args.tensor_parallel_size < 1:
        raise InputError(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    if args.kv_cache_gib < 1:
        raise InputError(f"--kv-cache-gib must be >= 1, got {args.kv_cache_gib}")
    if args.block_size is not None and args.block_size < 1:
        raise InputError(f"--block-size must be >= 1, got {args.block_size}")
    if args.threshold < 1 or args.warmup < 0:
        raise InputError("--threshold must be >= 1 and --warmup >= 0")
    needed = grid.max_context()
    if args.max_model_len is not None and args.max_model_len < needed:
        raise InputError(f"--max-model-len {args.max_model_len} is below the grid's longest "
                         f"context ({needed} tokens)")
    largest_batch = max(len(lens) for lens in grid.prefill_shapes())
    cpu_cores = args.cpu_cores or os.environ.get(_CPU_BIND_ENV)
    if cpu_cores in ("auto", "nobind", ""):
        cpu_cores = None  # vLLM's own policies: profile unbound
    if cpu_cores is not None:
        parse_cores(cpu_cores)
    return EngineSettings(
        model_path=model_path, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
        block_size=args.block_size, max_model_len=args.max_model_len or _round_up(needed, 256),
        kv_cache_gib=args.kv_cache_gib, cpu_cores=cpu_cores,
        max_num_batched_tokens=max(grid.prefill_max_batch_tokens, grid.decode_max_batch_tokens),
        max_num_seqs=max(largest_batch, *grid.decode_batch_sizes))


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def _check_writable(path: Path | None) -> None:
    """Fail before minutes of profiling, not after."""
    if path is None:
        return
    parent = path.expanduser().resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create {parent}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write to {parent}")


def _fail(message: str, code: int) -> int:
    print(f"pdserve profile: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """`pdserve profile` on the real engine."""
    return profile_command(args, VllmStepTimer)


def profile_command(args: argparse.Namespace,
                    make_engine: Callable[[EngineSettings], ProfilingEngine]) -> int:
    """`pdserve profile` with any engine (tests pass a fake): check inputs, measure, fit, write."""
    try:
        grid = _grid_from_args(args)
        model_path, name = _model_from_args(args)
        shape = load_model_shape(str(model_path))
        settings = _settings_from_args(args, model_path, grid)
        _check_writable(args.output)
        _check_writable(args.samples_output)
    except (InputError, ModelShapeError) as e:
        return _fail(str(e), 2)

    def progress(message: str) -> None:
        print(f"[profile] {message}", file=sys.stderr, flush=True)

    timer = make_engine(settings)
    started = time.perf_counter()
    try:
        progress(f"starting the engine on {model_path} (about 30 s)")
        facts = timer.start()
        progress(f"engine up: {facts.device}; KV {facts.kv_capacity_tokens} tokens "
                 f"(block {facts.block_size}); {len(grid.prefill_shapes())} prefill shapes x "
                 f"{grid.repeats}, {len(grid.decode_shapes())} decode points")
        timer.warm_up(grid, args.warmup)
        data = measure_grid(grid, timer, progress)
    except Exception as e:  # the engine's failure modes are many; report one line
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        return _fail(f"profiling failed: {type(e).__name__}: {lines[-1] if lines else ''}", 1)
    finally:
        timer.close()
    kv_bytes = shape.model_copy(update={"dtype_bytes": facts.kv_dtype_bytes}).kv_bytes_per_token
    try:
        entry = fit_profile(data.prefill, data.decode, threshold=args.threshold,
                            hardware=facts.device, kv_bytes_per_token=kv_bytes,
                            kv_capacity_tokens=facts.kv_capacity_tokens or None)
    except ValueError as e:
        return _fail(f"fit failed: {e}", 1)
    document = profile_document(name, {settings.tensor_parallel_size: entry})
    print(f"Profile of {name} (TP{settings.tensor_parallel_size}) on {facts.device}, "
          f"measured in {time.perf_counter() - started:.0f} s")
    print(f"KV: {kv_bytes} bytes/token, capacity {facts.kv_capacity_tokens} tokens "
          f"({settings.kv_cache_gib} GiB, block {facts.block_size})")
    print(render_fit_report(entry, assess_fit(entry, data), data))
    text = json.dumps(document, indent=2) + "\n"
    if args.samples_output is not None:
        args.samples_output.write_text(json.dumps({
            "prefill": [[list(s.input_lens), s.time_ms] for s in data.prefill],
            "decode": [[list(s.context_lens), s.time_ms] for s in data.decode]}) + "\n")
    if args.output is None:
        print(text, end="")
    else:
        args.output.write_text(text)
        print(f"Wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve profile", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # vLLM may spawn processes that re-import the main module
    sys.exit(main())
