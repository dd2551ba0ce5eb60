"""Summarise py-spy raw (collapsed-stack) profiles into CPU cost per stage.

    py-spy record --pid PID --rate 100 --format raw --nonblocking -o router.txt --duration 15
    python -m bench.profile_summary router.txt --rate 100 --requests 480 --tokens 30720

Each sample is attributed to one stage: the innermost frame that matches a stage rule
(rules are tried in order for that frame), else `other`. CPU seconds = samples / rate
(py-spy records only non-idle samples by default), so with the number of requests and
output tokens completed during the recording the table gives CPU per request and per
token of every stage. `--top N` adds the N functions with the most self samples.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# (stage, regex on "function (file:line)"), first match wins within one frame.
STAGE_RULES: tuple[tuple[str, str], ...] = (
    ("tokenize (router/tokenizer.py)", r"router/tokenizer\.py|tokenizers/|tokenization_utils"),
    ("detokenize/stop strings (router/output_text.py)", r"router/output_text\.py"),
    ("OpenAI protocol/JSON (router)", r"router/openai_protocol\.py|router/api_fields\.py"),
    ("handoff state machine (router/handoff.py)", r"router/handoff\.py"),
    ("routing/pool (router/pool.py, prefix.py)", r"router/pool\.py|router/prefix\.py"),
    ("router metrics", r"router/metrics\.py|prometheus_client"),
    ("router app (router/app.py)", r"router/app\.py"),
    ("channel (cluster/channel.py)", r"cluster/channel\.py"),
    ("msgspec encode/decode", r"msgspec"),
    ("Ray serialization (pickle)", r"ray/_private/serialization|ray/cloudpickle|pickle"),
    ("Ray core calls/streaming", r"ray/|_raylet"),
    ("vLLM output processing", r"vllm/v1/engine/output_processor|vllm/v1/engine/detokenizer|"
                               r"vllm/outputs\.py|vllm/v1/metrics"),
    ("vLLM envs look-ups", r"vllm/envs\.py"),
    ("vLLM engine client (AsyncLLM, core client)", r"vllm/v1/engine/async_llm|"
                                                   r"vllm/v1/engine/core_client"),
    ("vLLM engine core (scheduler, model runner)", r"vllm/v1/(core|worker|executor|engine/core)|"
                                                   r"vllm/model_executor|torch/"),
    ("vLLM API server", r"vllm/entrypoints"),
    ("vLLM other", r"vllm/"),
    ("decode/prefill/colocated worker", r"decode_worker/|prefill_worker/|cluster/engine_host"),
    ("KV transfer", r"kvtransfer/"),
    ("HTTP server (uvicorn/h11/starlette/fastapi)", r"uvicorn/|h11/|httptools|starlette/|"
                                                    r"fastapi/|anyio/"),
    ("pydantic validation", r"pydantic"),
    ("json", r"json/|orjson"),
    ("asyncio event loop", r"asyncio/|uvloop"),
    ("logging", r"logging/"),
)
_COMPILED = tuple((stage, re.compile(rx)) for stage, rx in STAGE_RULES)


def parse_raw(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.rstrip()
        if not line:
            continue
        head, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stacks.append((head.split(";"), int(count)))
    return stacks


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        for stage, rx in _COMPILED:
            if rx.search(frame):
                return stage
    return "other"


def summarise(stacks: list[tuple[list[str], int]]) -> tuple[Counter, Counter, int]:
    stages: Counter = Counter()
    leaves: Counter = Counter()
    total = 0
    for frames, count in stacks:
        total += count
        stages[stage_of(frames)] += count
        leaves[frames[-1] if frames else "?"] += count
    return stages, leaves, total


def format_report(path: Path, rate_hz: float, requests: int | None, tokens: int | None,
                  top: int, cpu_s: float | None = None) -> str:
    """Per-stage table. With `cpu_s` (the process's measured CPU time over the recording,
    e.g. from /proc) each stage's CPU is its share of samples times `cpu_s`: py-spy's
    sample count over-counts threads that are runnable but not on a CPU."""
    stages, leaves, total = summarise(parse_raw(path))
    if total == 0:
        return f"{path.name}: no samples"
    scale = (cpu_s / total) if cpu_s is not None else (1.0 / rate_hz)
    lines = [f"{path.name}: {total} samples = {total / rate_hz:.2f} sampled CPU s"
             + (f", scaled to the measured {cpu_s:.2f} CPU s" if cpu_s is not None else "")]
    header = f"  {'stage':<48} {'share':>6} {'CPU s':>7}"
    if requests:
        header += f" {'us/req':>8}"
    if tokens:
        header += f" {'us/token':>9}"
    lines.append(header)
    for stage, n in stages.most_common():
        stage_s = n * scale
        row = f"  {stage:<48} {n / total:>6.1%} {stage_s:>7.2f}"
        if requests:
            row += f" {stage_s / requests * 1e6:>8.0f}"
        if tokens:
            row += f" {stage_s / tokens * 1e6:>9.1f}"
        lines.append(row)
    if top:
        lines.append(f"  top {top} functions by self samples:")
        for frame, n in leaves.most_common(top):
            lines.append(f"    {n / total:>6.1%}  {frame[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", type=Path, nargs="+", help="py-spy --format raw outputs")
    parser.add_argument("--rate", type=float, default=100.0, help="py-spy --rate (Hz)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests completed while recording (per-request cost)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="output tokens streamed while recording (per-token cost)")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    for path in args.profiles:
        if not path.is_file():
            print(f"profile_summary: error: no such file: {path}", file=sys.stderr)
            return 2
        print(format_report(path, args.rate, args.requests, args.tokens, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
