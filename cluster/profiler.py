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
import sys
import time
from pathlib import Path
from typing import Callable

from cluster.planner.model_shape import ModelShapeError, load_model_shape
from cluster.planner.profile_fit import fit_profile, profile_document
from cluster.profile_engine import (
    CPU_BIND_ENV,
    EngineFacts,
    EngineSettings,
    ProfilingEngine,
    VllmStepTimer,
    describe_hardware,
    parse_cores,
)
from cluster.profile_grid import (
    FitQuality,
    InputError,
    Measurements,
    ProfileGrid,
    StepTimer,
    assess_fit,
    fit_quality,
    measure_grid,
    render_fit_report,
)

# The profiler's public names, wherever they are defined (tests and `pdserve profile` use these).
__all__ = ["EngineFacts", "EngineSettings", "FitQuality", "InputError", "Measurements",
           "ProfileGrid", "ProfilingEngine", "StepTimer", "VllmStepTimer", "add_arguments",
           "assess_fit", "describe_hardware", "fit_profile", "fit_quality", "main",
           "measure_grid", "parse_cores", "profile_command", "render_fit_report", "run"]



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
    cpu_cores = args.cpu_cores or os.environ.get(CPU_BIND_ENV)
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
                            kv_capacity_tokens=facts.kv_capacity_tokens or None,
                            whole_iterations=True)  # VllmStepTimer times LLMEngine.step()
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
