"""KV-transfer micro-benchmark: bandwidth by transport and message size, and TTFT overhead.

    python -m bench.transfer_bench [--json PATH]            bandwidth table
    python -m bench.transfer_bench --ttft [--json PATH]      TTFT cost of staging on a prefill
    python -m bench.transfer_bench --device-path [--json P]  GPU data path (CPU: host tensors)

(Over 350 lines: one benchmark command per mode of the same data path, each small; they
share the table, reps and machine helpers.)

Bandwidth mode measures, in one run and for messages of 64 KiB .. 256 MiB (powers of 4):

    memcpy  single-thread copy of the same number of bytes (numpy.copyto, warm buffers):
            the machine's reference bandwidth, measured in the same run
    fresh   the same copy into a newly created /dev/shm file (create, mmap, copy, unlink):
            what writing any new segment pays for page allocation; a second reference
    shm     the shared-memory transport: the decode's connector opens a staged segment, copies
            it into its (non-contiguous) blocks (start_load_kv) and recycles the file into
            the producer's pool. One copy; the only part of a same-host transfer that is
            not overlapped with the prefill's forward.
    stage+shm  the connector's whole same-host path: gather each layer's paged blocks into
            a segment (save_kv_layer, as the prefill computes), mark it complete, then the
            shm load above. Two copies.
    tcp     fetch_segment of a staged segment from a TransferServer on 127.0.0.1 (sendfile
            → recv into a recycled, mapped file of the consumer's pool → ack → producer
            lets go). The wire leg only.
    gloo    DistTransport.send_segment / recv_segment between two processes on 127.0.0.1
            (handshake, header, payload into a fresh mmap'd file, ack). The wire leg only.

Each cell is the median of several repetitions; bandwidth counts payload bytes (the 4 KiB
segment header is not counted). Torch runs single-threaded here so every ratio compares
one core with one core.

TTFT mode serves a 2048-token prompt on vLLM (CPU, the embedded "small" model) on three
engines: without the connector, with it as kv_producer staging each layer as soon as it is
computed (layer-wise, the default), and with it staging every layer after the forward.
Requests alternate between the engines; it reports the median TTFT of each and the
connector's overhead in both modes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

KIB, MIB = 1 << 10, 1 << 20
SIZES = [64 * KIB * 4**i for i in range(7)]  # 64 KiB .. 256 MiB
TRANSPORTS = ["shm", "stage+shm", "tcp", "gloo"]
BLOCK_SHAPE = (4, 32, 128)  # [kv_heads, block_size, 2 * head_dim] fp16: 32 KiB per block
BLOCK_NBYTES = 4 * 32 * 128 * 2


@dataclass(frozen=True)
class Cell:
    transport: str
    size_bytes: int
    median_s: float
    min_s: float
    reps: int

    @property
    def gbps(self) -> float:
        return self.size_bytes / self.median_s / 1e9


def _reps_for(size: int) -> int:
    return {64 * KIB: 40, 256 * KIB: 30, 1 * MIB: 15, 4 * MIB: 8, 16 * MIB: 5}.get(size, 3)


def _cell(transport: str, size: int, durations: list[float]) -> Cell:
    return Cell(transport, size, statistics.median(durations), min(durations), len(durations))


def _shape_for(size: int) -> tuple[int, int]:
    """(num_layers, blocks per layer) of a message: one layer up to 256 KiB, then 8."""
    num_layers = 1 if size <= 256 * KIB else 8
    return num_layers, size // (num_layers * BLOCK_NBYTES)


# ----------------------------------------------------------------------- memcpy and shm
def bench_memcpy(size: int) -> Cell:
    src = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in once; the reference is a warm copy
    durations = []
    for _ in range(_reps_for(size) + 1):
        start = time.perf_counter()
        np.copyto(dst, src)
        durations.append(time.perf_counter() - start)
    return _cell("memcpy", size, durations[1:])


def bench_fresh_pages(size: int, staging: Path) -> Cell:
    """memcpy into a new /dev/shm file: what any path that writes a fresh segment pays for
    page allocation (fault + zeroing) on top of the copy itself."""
    import mmap

    src = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    path = staging / "pdserve-kv-fresh-pages"
    durations = []
    for _ in range(_reps_for(size)):
        start = time.perf_counter()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        os.close(fd)
        dst = np.frombuffer(mm, dtype=np.uint8)
        np.copyto(dst, src)
        del dst
        mm.close()
        path.unlink()
        durations.append(time.perf_counter() - start)
    return _cell("fresh", size, durations)


def _stand_in_connector(role: str, staging: Path, engine_id: str, block_size: int):
    """A worker-half PdserveConnector without an engine (kvtransfer.testing, as the tests)."""
    from kvtransfer.testing import make_connector

    return make_connector(role, staging, engine_id, block_size, lease_s=600)


class ShmPath:
    """The connector's save + load of one message, with caches of twice its size."""

    def __init__(self, size: int, staging: Path):
        import torch

        from kvtransfer.metadata import LoadSpec, PdserveConnectorMetadata, SaveSpec

        num_layers, num_blocks = _shape_for(size)
        block_size = BLOCK_SHAPE[1]
        self.caches_src = {f"layer.{i}": torch.randn(2 * num_blocks, *BLOCK_SHAPE).half()
                           for i in range(num_layers)}  # [num_blocks, H, N, C]
        self.caches_dst = {n: torch.zeros_like(kv) for n, kv in self.caches_src.items()}
        self.producer = _stand_in_connector("kv_producer", staging, "bench-p", block_size)
        self.consumer = _stand_in_connector("kv_consumer", staging, "bench-d", block_size)
        self.producer.register_kv_caches(self.caches_src)
        self.consumer.register_kv_caches(self.caches_dst)
        self.path = staging / "pdserve-kv-bench-p-req"
        num_tokens = num_blocks * block_size
        # Non-contiguous block ids on both sides, as a paged cache hands them out.
        self.save_meta = PdserveConnectorMetadata(saves=[SaveSpec(
            request_id="req", segment_path=str(self.path),
            block_ids=tuple(range(1, 2 * num_blocks, 2)), first_block=0, end_token=num_tokens,
            num_prompt_tokens=num_tokens)])
        self.load_meta = PdserveConnectorMetadata(loads=[LoadSpec(
            request_id="req", segment_path=str(self.path),
            dst_block_ids=tuple(range(0, 2 * num_blocks, 2)), first_block=0)])

    def stage(self) -> None:
        from kvtransfer.testing import run_save_step

        run_save_step(self.producer, self.caches_src, self.save_meta)

    def load(self) -> None:
        from kvtransfer.testing import run_load_step

        run_load_step(self.consumer, *self.load_meta.loads)
        if self.consumer.get_block_ids_with_load_errors():
            raise RuntimeError("benchmark load failed")

    def round_trip(self) -> None:
        self.stage()
        self.load()


def bench_shm(size: int, staging: Path) -> list[Cell]:
    """The shm load alone and stage + load, in steady state (the producer's pool and both
    sides' mappings warm, as on a serving instance after its first requests)."""
    path = ShmPath(size, staging)
    for _ in range(2):
        path.round_trip()  # warm-up: the pool's first file and both mappings
    first_src = next(iter(path.caches_src.values()))
    first_dst = next(iter(path.caches_dst.values()))
    assert bool((first_dst[0::2] == first_src[1::2]).all()), "shm round trip corrupted blocks"
    load, both = [], []
    for _ in range(_reps_for(size)):
        start = time.perf_counter()
        path.stage()
        staged = time.perf_counter()
        path.load()
        end = time.perf_counter()
        load.append(end - staged)
        both.append(end - start)
    path.producer.shutdown()
    path.consumer.shutdown()
    return [_cell("shm", size, load), _cell("stage+shm", size, both)]


# ------------------------------------------------------------------------------- tcp
def _staged_template(size: int, staging: Path, name: str) -> Path:
    """A complete segment holding `size` payload bytes, to hard-link per repetition."""
    from kvtransfer.staging import SegmentLayout, StagingSegment

    num_layers, num_blocks = _shape_for(size)
    layout = SegmentLayout(layer_names=[f"layer.{i}" for i in range(num_layers)],
                           bytes_per_block=[BLOCK_NBYTES] * num_layers, num_blocks=num_blocks,
                           num_tokens=num_blocks * BLOCK_SHAPE[1], block_size=BLOCK_SHAPE[1])
    path = staging / name
    path.unlink(missing_ok=True)
    seg = StagingSegment.create(path, layout)
    rng = np.random.default_rng(size)
    for i in range(num_layers):
        view = seg.layer_view(i)
        view[:] = rng.integers(0, 256, len(view), dtype=np.uint8).tobytes()
        view.release()
    seg.mark_complete()
    seg.close()
    return path


def bench_tcp(size: int, staging: Path) -> Cell:
    from kvtransfer.staging import SegmentPool, StagingSegment
    from kvtransfer.tcp import TransferServer, fetch_segment

    producer_dir, consumer_dir = staging / "tcp-producer", staging / "tcp-consumer"
    producer_dir.mkdir(exist_ok=True)
    consumer_dir.mkdir(exist_ok=True)
    template = _staged_template(size, staging, "pdserve-kv-template-tcp")
    server = TransferServer(producer_dir, "bench", host="127.0.0.1").start()
    # The consumer receives into files of its own pool, as TcpTransport does.
    pool = SegmentPool(consumer_dir, "bench-fetch", max_bytes=1 << 30)
    durations = []
    try:
        for i in range(_reps_for(size) + 2):
            name = f"pdserve-kv-bench-{i}"
            os.link(template, producer_dir / name)  # staged (untimed): the server unlinks it
            start = time.perf_counter()
            dest, _ = fetch_segment("127.0.0.1", server.port, name, "bench", consumer_dir, 60.0,
                                    pool=pool)
            durations.append(time.perf_counter() - start)
            StagingSegment.open(dest).recycle()  # loaded: back to the consumer's pool
    finally:
        server.close()
        pool.close()
        template.unlink()
    return _cell("tcp", size, durations[2:])  # the first two fill the pool


# ------------------------------------------------------------------------------ gloo
def _gloo_worker(rank: int, store_port: int, sizes: list[int], staging: str, out: str) -> None:
    """Rank 0 stages and sends; rank 1 receives, times each transfer and writes the result."""
    import torch
    from torch.distributed import TCPStore

    from kvtransfer.dist import DistTransport

    torch.set_num_threads(1)
    staging_dir = Path(staging)
    store = TCPStore("127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=300))
    role = "prefill" if rank == 0 else "decode"
    me = DistTransport(f"bench-{role}", role, store, backend="gloo", timeout_s=300)
    peer = "bench-decode" if rank == 0 else "bench-prefill"
    results: dict[str, object] = {"durations": {}}
    for size in [SIZES[0], *sizes]:  # the first transfer also builds the pair's group
        is_warmup = "setup_s" not in results
        reps = 1 if is_warmup else _reps_for(size) + 1
        template = _staged_template(size, staging_dir, f"pdserve-kv-template-{size}") if rank == 0 else None
        durations = []
        for i in range(reps):
            tid, ready = f"{size}-{i}-{is_warmup}", f"bench/ready/{size}/{i}/{is_warmup}"
            if rank == 0:
                src = staging_dir / f"pdserve-kv-gloo-{tid}"
                os.link(template, src)  # staged (untimed)
                store.set(ready, b"1")
                me.send_segment(peer, tid, src)
            else:
                store.wait([ready])
                dest = staging_dir / f"pdserve-kv-gloo-recv-{tid}"
                start = time.perf_counter()
                me.recv_segment(peer, tid, dest)
                durations.append(time.perf_counter() - start)
                dest.unlink()
        if template is not None:
            template.unlink()
        if rank == 1:
            if is_warmup:
                results["setup_s"] = durations[0]
            else:
                results["durations"][str(size)] = durations[1:]
        else:
            results["setup_s"] = 0.0  # marks the warm-up done on the sender too
    me.close()
    if rank == 1:
        Path(out).write_text(json.dumps(results))


def bench_gloo(sizes: list[int], staging: Path) -> tuple[list[Cell], float]:
    import torch.multiprocessing as mp
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=300))
    out = staging / "gloo-results.json"
    mp.spawn(_gloo_worker, args=(store.port, sizes, str(staging), str(out)), nprocs=2, join=True)
    results = json.loads(out.read_text())
    cells = [_cell("gloo", size, results["durations"][str(size)]) for size in sizes]
    return cells, results["setup_s"]


# --------------------------------------------------------------------------- reporting
def _fmt_size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def bandwidth_table(cells: list[Cell]) -> str:
    by = {(c.transport, c.size_bytes): c for c in cells}
    sizes = sorted({c.size_bytes for c in cells})
    head = (f"{'size':>8} | {'memcpy GB/s':>11} | {'fresh GB/s':>10} {'x memcpy':>8} |"
            + "".join(f" {t + ' GB/s':>10} {'ms':>8} {'x memcpy':>8} |" for t in TRANSPORTS))
    lines = [head, "-" * len(head)]
    for size in sizes:
        memcpy, fresh = by[("memcpy", size)], by[("fresh", size)]
        row = (f"{_fmt_size(size):>8} | {memcpy.gbps:>11.2f} | {fresh.gbps:>10.2f} "
               f"{fresh.gbps / memcpy.gbps:>8.3f} |")
        for t in TRANSPORTS:
            c = by.get((t, size))
            row += (f" {c.gbps:>10.2f} {c.median_s * 1e3:>8.2f} {c.gbps / memcpy.gbps:>8.3f} |"
                    if c else f" {'-':>10} {'-':>8} {'-':>8} |")
        lines.append(row)
    return "\n".join(lines)


def _machine() -> dict[str, object]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_1m": os.getloadavg()[0]}  # other tenants of a shared machine show here


def run_bandwidth(args: argparse.Namespace) -> dict[str, object]:
    import torch

    torch.set_num_threads(1)
    sizes = [s for s in SIZES if s <= args.max_size_mib * MIB]
    base = Path(args.staging_dir) if args.staging_dir else None
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-", dir=base or _default_staging()) as tmp:
        staging = Path(tmp)
        cells: list[Cell] = []
        for size in sizes:
            cells.append(bench_memcpy(size))
            cells.append(bench_fresh_pages(size, staging))
            cells.extend(bench_shm(size, staging))
            cells.append(bench_tcp(size, staging))
            print(f"  {_fmt_size(size)}: memcpy, fresh, shm, tcp done", file=sys.stderr, flush=True)
        gloo_cells, setup_s = bench_gloo(sizes, staging)
        cells += gloo_cells
    print(f"\nKV transfer bandwidth (median of reps; {os.cpu_count()} CPUs, torch threads 1, "
          f"staging {_default_staging()}, load average {os.getloadavg()[0]:.1f})")
    print(bandwidth_table(cells))
    print("x memcpy: bandwidth / warm single-thread memcpy bandwidth of the same size. fresh: "
          "memcpy into a new /dev/shm file.\nshm = the decode's load of a staged segment into "
          "its blocks (one copy); stage+shm = the prefill's layer-wise staging copy + that load "
          "(two copies);\ntcp, gloo = wire leg only, acked (tcp: into a pooled file on the "
          "consumer; gloo: into a new file).")
    print(f"gloo pair-group setup (first transfer, incl. rendezvous): {setup_s * 1e3:.1f} ms")
    return {"mode": "bandwidth", "machine": _machine(), "gloo_group_setup_s": setup_s,
            "cells": [dict(asdict(c), gbps=c.gbps) for c in cells]}


def _default_staging() -> str:
    from kvtransfer.staging import default_staging_dir

    return str(default_staging_dir())


# -------------------------------------------------------------------------------- ttft
def _ttft_engines(prompt_tokens: int, staging: Path, cpu_cores: str) -> dict[str, object]:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from cluster.tiny_model import ensure_tiny_model

    common = {"model": str(ensure_tiny_model("small")), "max_model_len": prompt_tokens + 64,
              "enable_prefix_caching": False, "max_num_seqs": 4, "seed": 0}

    from cluster.config import KVTransferSettings
    from kvtransfer.params import vllm_kv_transfer_config

    def producer_config(engine_id: str, layerwise: bool) -> KVTransferConfig:
        settings = KVTransferSettings(lease_s=60, layerwise=layerwise)
        return KVTransferConfig(**vllm_kv_transfer_config("kv_producer", settings, engine_id,
                                                          staging))

    # The same cores for both engines: left to vLLM's automatic binding, the second engine
    # starts while the first holds a core and gets a different set, which voids the A/B.
    # Requests alternate between the engines, so they never compute at the same time.
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
    engines: dict[str, object] = {}
    variants = (("no connector", {}),
                (LAYERWISE, {"kv_transfer_config": producer_config("bench-ttft-lw", True)}),
                (AFTER_FORWARD, {"kv_transfer_config": producer_config("bench-ttft-af", False)}))
    for name, extra in variants:
        start = time.perf_counter()
        engines[name] = LLM(**common, **extra)
        print(f"  engine '{name}' ready in {time.perf_counter() - start:.0f} s", file=sys.stderr,
              flush=True)
    return engines


LAYERWISE, AFTER_FORWARD = "layer-wise", "after forward"


def _serve_one(llm, prompt_ids: list[int]):
    """TTFT of one request (offline, one output token) and the layout it staged, if any."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvtransfer.params import StagedKV
    from kvtransfer.segment import StagingSegment

    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    start = time.perf_counter()
    (output,) = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)
    ttft_s = time.perf_counter() - start
    staged = StagedKV.from_params(output.kv_transfer_params)
    if staged is None:
        return ttft_s, None
    seg = StagingSegment.open(Path(staged.segment_path))
    layout = seg.header.layout
    seg.recycle()  # no decode here: give it back as the consumer does after loading
    return ttft_s, layout


def _staging_cost_alone(layout, staging: Path, reps: int = 10) -> float:
    """Median time of the prefill side of the connector (save_kv_layer for every layer, then
    wait_for_save) at the engine's own segment layout, outside the engine."""
    import torch

    from kvtransfer.metadata import PdserveConnectorMetadata, SaveSpec
    from kvtransfer.segment import StagingSegment
    from kvtransfer.testing import run_save_step

    torch.set_num_threads(1)  # as the engine serves (vLLM reduces its torch threads to one)
    producer = _stand_in_connector("kv_producer", staging, "bench-alone", layout.block_size)
    n = layout.num_blocks
    caches = {name: torch.randint(0, 255, (2 * n, nbytes), dtype=torch.uint8)  # [blocks, bytes]
              for name, nbytes in zip(layout.layer_names, layout.bytes_per_block)}
    producer.register_kv_caches(caches)
    path = staging / "pdserve-kv-bench-alone-req"
    meta = PdserveConnectorMetadata(saves=[SaveSpec(
        request_id="req", segment_path=str(path), block_ids=tuple(range(1, 2 * n, 2)),
        first_block=0, end_token=layout.num_tokens, num_prompt_tokens=layout.num_tokens)])
    durations = []
    for _ in range(reps):
        start = time.perf_counter()
        run_save_step(producer, caches, meta)
        durations.append(time.perf_counter() - start)
        StagingSegment.open(path).recycle()
    producer.shutdown()
    return statistics.median(durations)


def run_ttft(args: argparse.Namespace) -> dict[str, object]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from kvtransfer.staging import list_segments

    base = Path(args.staging_dir) if args.staging_dir else Path(_default_staging())
    staging = Path(tempfile.mkdtemp(prefix="pdserve-ttft-", dir=base))
    engines = _ttft_engines(args.prompt_tokens, staging, args.ttft_cpu_cores)
    rng = np.random.default_rng(0)
    prompts = iter(lambda: rng.integers(8, 1800, args.prompt_tokens).tolist(), None)
    for name, llm in engines.items():  # warm-up: first requests pay one-off costs
        for _ in range(2):
            _serve_one(llm, next(prompts))
    ttft: dict[str, list[float]] = {name: [] for name in engines}
    layout = None
    names = list(engines)
    for i in range(args.ttft_reps):
        # Alternate which engine goes first, so drift on a shared machine hits both alike.
        for name in names if i % 2 == 0 else names[::-1]:
            ttft_s, staged_layout = _serve_one(engines[name], next(prompts))
            ttft[name].append(ttft_s)
            layout = staged_layout or layout
    leftover = list_segments(staging)
    for path in leftover:
        path.unlink()
    del engines
    if layout is None:
        raise RuntimeError("the kv_producer engine staged nothing: is the connector loaded?")
    staging_s = _staging_cost_alone(layout, staging)
    shutil.rmtree(staging, ignore_errors=True)  # the engines' segment pools

    median = {n: statistics.median(v) for n, v in ttft.items()}
    best = {n: min(v) for n, v in ttft.items()}
    base_s = median["no connector"]
    overhead = {n: median[n] / base_s - 1 for n in (LAYERWISE, AFTER_FORWARD)}
    overhead_best = {n: best[n] / best["no connector"] - 1 for n in (LAYERWISE, AFTER_FORWARD)}
    staged_nbytes = layout.num_blocks * sum(layout.bytes_per_block)
    print(f"\nTTFT of a {args.prompt_tokens}-token prompt (vLLM CPU, embedded 'small' model, "
          f"{args.ttft_reps} requests per engine, interleaved; both engines on core(s) "
          f"{args.ttft_cpu_cores} of {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")
    print(f"{'engine':>14} | {'median ms':>9} | {'min ms':>8} | {'max ms':>8}")
    for name, values in ttft.items():
        print(f"{name:>14} | {median[name] * 1e3:>9.1f} | {best[name] * 1e3:>8.1f} | "
              f"{max(values) * 1e3:>8.1f}")
    for n in (LAYERWISE, AFTER_FORWARD):
        print(f"overhead of the connector staging {n}: {overhead[n] * 100:+.1f}% on the median, "
              f"{overhead_best[n] * 100:+.1f}% on the best TTFT")
    print(f"staged per request: {staged_nbytes / MIB:.1f} MiB ({len(layout.layer_names)} layers x "
          f"{layout.num_blocks} blocks x {layout.bytes_per_block[0] // KIB} KiB, block size "
          f"{layout.block_size}); segments left behind: {len(leftover)}")
    print(f"the connector's save path alone at that layout: {staging_s * 1e3:.1f} ms = "
          f"{staging_s / base_s * 100:.1f}% of the median TTFT without it (target <= 10%)")
    return {"mode": "ttft", "machine": _machine(), "prompt_tokens": args.prompt_tokens,
            "cpu_cores": args.ttft_cpu_cores,
            "ttft_s": ttft, "median_ttft_s": median, "min_ttft_s": best,
            "overhead_fraction_median": overhead, "overhead_fraction_min": overhead_best,
            "staged_bytes_per_request": staged_nbytes, "staging_alone_s": staging_s,
            "staging_alone_fraction": staging_s / base_s, "leftover_segments": len(leftover)}


# ------------------------------------------------------------------------- device path
# Llama-3-8B's KV: 32 layers, 8 KV heads (GQA), head_dim 128, bf16; vLLM block size 16.
LLAMA3_8B = {"num_layers": 32, "num_kv_heads": 8, "head_size": 128, "dtype": "bfloat16",
             "block_size": 16}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _median_s(fn, device: str, reps: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_bandwidth(sizes: list[int], device: str) -> list[dict[str, float]]:
    """Per size, in one run: d2d (a plain device-to-device copy of the same bytes, the
    reference), stage (LayerwiseStager's gather of that many bytes of paged blocks into an
    arena slab) and, on CUDA, cuda_ipc (a copy from another process's lent buffer,
    `cuda_ipc.bench_cuda_ipc`, which measures its own d2d reference side by side)."""
    import torch

    from kvtransfer.device_staging import DeviceArena, LayerwiseStager

    rows = []
    for size in sizes:
        src = torch.empty(size, dtype=torch.uint8, device=device).fill_(3)
        dst = torch.empty_like(src)
        d2d_s = _median_s(lambda: dst.copy_(src), device, _reps_for(size))
        num_blocks = max(1, size // BLOCK_NBYTES)
        cache = torch.zeros(2 * num_blocks, *BLOCK_SHAPE, dtype=torch.float16, device=device)
        arena = DeviceArena(num_blocks * BLOCK_NBYTES + 4096, device=device)
        stager = LayerwiseStager(arena, {"l0": cache})
        ids = list(range(1, 2 * num_blocks, 2))

        def stage() -> None:
            slab = stager.begin("bench", ids)
            stager.save_layer(slab, "l0", cache)
            stager.finish(slab)
            if slab.done_event is not None:
                slab.done_event.synchronize()
            arena.free(slab)

        stage_s = _median_s(stage, device, _reps_for(size))
        rows.append({"size_bytes": size, "d2d_gbps": size / d2d_s / 1e9,
                     "stage_gbps": num_blocks * BLOCK_NBYTES / stage_s / 1e9,
                     "stage_x_d2d": (num_blocks * BLOCK_NBYTES / stage_s) / (size / d2d_s)})
        del src, dst, cache, arena, stager
    if device == "cuda":
        from kvtransfer.cuda_ipc import bench_cuda_ipc

        for row, ipc in zip(rows, bench_cuda_ipc(sizes)):
            row.update(ipc_gbps=ipc["ipc_gbps"], ipc_d2d_gbps=ipc["d2d_gbps"],
                       ipc_x_d2d=ipc["ipc_x_d2d"], ipc_open_ms=ipc["ipc_open_ms"])
    return rows


def simulate_layerwise_prefill(device: str, prompt_tokens: int = 2048, layer_ms: float = 4.0,
                               reps: int = 5, shape: dict = LLAMA3_8B) -> dict[str, object]:
    """A prefill of `prompt_tokens` with Llama-3-8B-shaped KV: per layer a compute kernel of
    known duration (`layer_ms`; CUDA: torch.cuda._sleep calibrated to it; CPU: a sleep that
    releases the GIL), after which LayerwiseStager gathers that layer on its own stream (CPU:
    a staging thread) and the slab's layer region is copied to a decode buffer (the transfer
    leg: a device-to-device copy on a transfer stream, the in-process stand-in for the IPC
    copy whose bandwidth `device_bandwidth` reports against d2d).

    Reports compute alone, compute with staging + transfer streaming behind it, the
    transfer alone, the share of transfer time hidden behind compute, and the TTFT added
    (time from the end of the last layer's compute to the last byte at the decode, plus any
    slowdown of the compute itself)."""
    import threading

    import torch

    from kvtransfer.device_staging import DeviceArena, LayerwiseStager, region_view
    from kvtransfer.harness import ModelShape, vllm_cuda_kv_caches

    num_blocks = -(-prompt_tokens // shape["block_size"])
    model = ModelShape(num_layers=shape["num_layers"], num_kv_heads=shape["num_kv_heads"],
                       head_size=shape["head_size"], block_size=shape["block_size"],
                       num_blocks=num_blocks + 8, num_request_blocks=num_blocks,
                       dtype=shape["dtype"])
    caches = vllm_cuda_kv_caches(model, model.num_kv_heads, device)
    for kv in caches.values():
        kv.normal_()
    ids = list(range(3, 3 + num_blocks))[::-1]  # paged, reversed: a real gather
    layer_bytes = num_blocks * caches[next(iter(caches))][0].numel() * 2
    arena = DeviceArena(layer_bytes * model.num_layers + (1 << 20), device=device)
    stager = LayerwiseStager(arena, caches)
    decode_buf = torch.empty(layer_bytes * model.num_layers + (1 << 20), dtype=torch.uint8,
                             device=device)
    names = list(caches)
    is_cuda = device == "cuda"
    if is_cuda:
        cycles_per_ms = _calibrate_sleep()
        xfer_stream = torch.cuda.Stream()

    def compute_layer() -> None:
        if is_cuda:
            torch.cuda._sleep(int(cycles_per_ms * layer_ms))
        else:
            time.sleep(layer_ms / 1e3)

    def transfer_layer(slab, name) -> None:
        region = stager._regions[name]
        src = slab.view[region.offset : region.offset + region.nbytes]
        decode_buf[region.offset : region.offset + region.nbytes].copy_(src, non_blocking=True)

    def run(stage: bool, compute: bool) -> tuple[float, float]:
        """(seconds to the end of the last layer's compute, seconds to the last byte)."""
        slab = stager.begin("sim", ids) if stage else None
        start = time.perf_counter()
        compute_end = start
        if is_cuda:
            done_compute = torch.cuda.Event(enable_timing=True)
            t0 = torch.cuda.Event(enable_timing=True)
            t0.record()
            for name in names:
                if compute:
                    compute_layer()
                if stage:
                    stager.save_layer(slab, name, caches[name])
                    ev = torch.cuda.Event()
                    ev.record(stager.stream)
                    xfer_stream.wait_event(ev)
                    with torch.cuda.stream(xfer_stream):
                        transfer_layer(slab, name)
            done_compute.record()
            t_end = torch.cuda.Event(enable_timing=True)
            if stage:
                torch.cuda.current_stream().wait_stream(xfer_stream)
            t_end.record()
            t_end.synchronize()
            compute_s = t0.elapsed_time(done_compute) / 1e3
            total_s = t0.elapsed_time(t_end) / 1e3
        else:
            jobs: list = []
            worker = None
            if stage:
                import queue
                q: queue.Queue = queue.Queue()

                def staging_thread() -> None:
                    while (name := q.get()) is not None:
                        stager.save_layer(slab, name, caches[name])
                        transfer_layer(slab, name)

                worker = threading.Thread(target=staging_thread)
                worker.start()
            for name in names:
                if compute:
                    compute_layer()
                if stage:
                    q.put(name)
            compute_end = time.perf_counter()
            if worker is not None:
                q.put(None)
                worker.join()
            compute_s = compute_end - start
            total_s = time.perf_counter() - start
            del jobs
        if slab is not None:
            stager.finish(slab)
            arena.free(slab)
        return compute_s, total_s

    run(True, True)  # warm-up, then check what arrived (not timed)
    for name in (names[0], names[-1]):
        region = stager._regions[name]
        got = region_view(decode_buf, region)
        if not torch.equal(got.cpu(), caches[name][ids].cpu()):
            raise RuntimeError(f"simulated transfer delivered wrong blocks for {name}")
    base = [run(False, True)[0] for _ in range(reps)]
    both = [run(True, True) for _ in range(reps)]
    alone = [run(True, False)[1] for _ in range(reps)]
    base_s = statistics.median(base)
    compute_with_s = statistics.median(c for c, _ in both)
    total_with_s = statistics.median(t for _, t in both)
    transfer_s = statistics.median(alone)
    exposed_s = max(0.0, total_with_s - compute_with_s)
    added_s = total_with_s - base_s
    return {"device": device, "prompt_tokens": prompt_tokens, "layer_ms": layer_ms,
            "model": shape, "kv_bytes": layer_bytes * model.num_layers,
            "compute_alone_s": base_s, "compute_with_streaming_s": compute_with_s,
            "last_byte_s": total_with_s, "transfer_alone_s": transfer_s,
            "transfer_exposed_s": exposed_s,
            # Exposed time over the transfer's own time (a thread start and the GIL on a busy
            # host can make it longer) hides nothing, not a negative share.
            "transfer_hidden_share": max(0.0, 1 - exposed_s / transfer_s) if transfer_s > 0 else 1.0,
            "ttft_added_s": added_s, "ttft_added_share": added_s / base_s}


def _calibrate_sleep() -> float:
    """GPU clock cycles per millisecond of torch.cuda._sleep, measured here."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    torch.cuda._sleep(cycles // 10)  # warm-up
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def run_device_path(args: argparse.Namespace) -> dict[str, object]:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # one core against one core, as the bandwidth mode
    sizes = [s for s in SIZES if s <= args.max_size_mib * MIB]
    rows = device_bandwidth(sizes, device)
    print(f"device-path bandwidth on {device} (median of reps; stage = gather of paged blocks "
          f"into an arena slab)")
    cols = ["d2d_gbps", "stage_gbps", "stage_x_d2d"] + (
        ["ipc_gbps", "ipc_d2d_gbps", "ipc_x_d2d"] if device == "cuda" else [])
    print(f"{'size':>9} | " + " | ".join(f"{c:>12}" for c in cols))
    for row in rows:
        print(f"{_fmt_size(row['size_bytes']):>9} | " + " | ".join(f"{row[c]:>12.3f}" for c in cols))
    overlap = simulate_layerwise_prefill(device, args.prompt_tokens, args.layer_ms)
    print(f"simulated layer-wise prefill ({overlap['prompt_tokens']} tokens, Llama-3-8B KV "
          f"{overlap['kv_bytes'] / MIB:.0f} MiB, {args.layer_ms} ms per layer): compute "
          f"{overlap['compute_alone_s'] * 1e3:.1f} ms alone, transfer alone "
          f"{overlap['transfer_alone_s'] * 1e3:.1f} ms, hidden {overlap['transfer_hidden_share']:.1%}, "
          f"TTFT added {overlap['ttft_added_s'] * 1e3:.2f} ms ({overlap['ttft_added_share']:.1%})")
    return {"mode": "device-path", "device": device, "machine": _machine(),
            "bandwidth": rows, "overlap": overlap}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--ttft", action="store_true",
                        help="measure the connector's TTFT overhead on a real prefill instead")
    parser.add_argument("--max-size-mib", type=int, default=256,
                        help="largest message size (MiB) of the bandwidth sweep")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="TTFT prompt length")
    parser.add_argument("--ttft-reps", type=int, default=10,
                        help="measured requests per engine (after two warm-ups)")
    parser.add_argument("--ttft-cpu-cores", default=str((os.cpu_count() or 1) - 1),
                        help="cores both TTFT engines are bound to, e.g. '1' or '2-3' "
                        "(VLLM_CPU_OMP_THREADS_BIND; default: the last core)")
    parser.add_argument("--staging-dir", help="where segments go (default /dev/shm)")
    parser.add_argument("--device-path", action="store_true",
                        help="the GPU data path: arena staging and cuda_ipc bandwidth next to a "
                        "device-to-device copy, and a simulated layer-wise prefill "
                        "(Llama-3-8B KV) with the transfer streaming behind it")
    parser.add_argument("--layer-ms", type=float, default=4.0,
                        help="--device-path: simulated compute per layer (ms)")
    parser.add_argument("--cpu", action="store_true",
                        help="--device-path on host tensors even where CUDA is present")
    args = parser.parse_args(argv)
    if args.device_path:
        result = run_device_path(args)
    else:
        result = run_ttft(args) if args.ttft else run_bandwidth(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
