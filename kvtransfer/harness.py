"""A vLLM-free harness for the device data path: prefill and decode processes, block-exact checks.

Needs only torch (CUDA, NCCL where present); no vLLM, no Ray. Each case spawns the
prefill ranks and the decode ranks of one (prefill TP, decode TP) pair as processes that
run pdserve's own code: `device_staging.LayerwiseStager` gathers each layer on the prefill
(on a side stream on CUDA), `device_transfer` moves the slab (CUDA IPC, or `dist` over
NCCL or gloo), and `device_transfer.scatter_slab` scatters it into the decode's paged
blocks, slicing heads with `layout.plan_head_slices` when decode TP > prefill TP. Every
decode rank then compares every destination block with what the prefill computed,
byte for byte, and checks that no other block changed.

The KV caches are in exactly vLLM 0.32's CUDA attention layout (read from the installed
vLLM: `vllm/v1/attention/backends/flash_attn.py` documents the per-layer cache as
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, K in ``[..., :head_size]`` and V
in ``[..., head_size:]``; FlashAttention declares no `supported_kv_cache_layouts`, so the
default preference of `vllm/v1/attention/backends/utils.py` picks `KVCacheLayout.LBNHC`:
memory order ``[layers, blocks, block_size, heads, 2 * head_size]``). `vllm_cuda_kv_caches`
builds that: one contiguous ``[L, B, N, H, 2D]`` allocation, and per layer the logical
view ``raw[l].permute(0, 2, 1, 3)``, i.e. shape ``[B, H, N, 2D]`` with strides
``(N*H*2D, 2D, H*2D, 1)``. The heads axis of that view is 1 (`layout.HEADS_AXIS_VLLM`).

    python -m kvtransfer.harness --device cpu                  # gloo, host tensors (CI)
    python -m kvtransfer.harness --device cuda --json out.json # cuda_ipc (+ nccl on 2 GPUs)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch

from kvtransfer.layout import HEADS_AXIS_VLLM, kv_heads_of_rank, plan_head_slices


@dataclass(frozen=True)
class ModelShape:
    num_layers: int = 3
    num_kv_heads: int = 8  # model-wide
    head_size: int = 16
    block_size: int = 16
    num_blocks: int = 24  # per rank's cache
    num_request_blocks: int = 7  # the prompt's blocks (non-contiguous on both sides)
    dtype: str = "float16"


@dataclass(frozen=True)
class Case:
    prefill_tp: int
    decode_tp: int
    transport: str  # "dist" (backend below) or "cuda_ipc"
    backend: str = "gloo"  # dist only: gloo (host tensors) or nccl

    @property
    def name(self) -> str:
        via = f"dist-{self.backend}" if self.transport == "dist" else self.transport
        return f"tp{self.prefill_tp}->tp{self.decode_tp} over {via}"


def vllm_cuda_kv_caches(shape: ModelShape, num_local_heads: int, device: str | torch.device
                        ) -> dict[str, torch.Tensor]:
    """Per-layer caches in vLLM 0.32's CUDA (FlashAttention, LBNHC) layout, zeroed.

    Each value is a [num_blocks, num_local_heads, block_size, 2 * head_size] view of one
    [num_layers, num_blocks, block_size, num_local_heads, 2 * head_size] allocation."""
    dtype = getattr(torch, shape.dtype)
    raw = torch.zeros(shape.num_layers, shape.num_blocks, shape.block_size, num_local_heads,
                      2 * shape.head_size, dtype=dtype, device=device)
    return {f"model.layers.{i}.self_attn.attn": raw[i].permute(0, 2, 1, 3)
            for i in range(shape.num_layers)}


def global_kv(shape: ModelShape, seed: int) -> list[torch.Tensor]:
    """The model-wide KV a prefill computed, per layer: [num_blocks, H, N, 2D] on the CPU,
    from `seed` (every process regenerates the same values)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    return [torch.randn(shape.num_blocks, shape.num_kv_heads, shape.block_size,
                        2 * shape.head_size, generator=gen).to(dtype)
            for _ in range(shape.num_layers)]


def request_blocks(shape: ModelShape, seed: int) -> list[int]:
    """A non-contiguous, shuffled choice of block ids (as a paged allocator hands them out)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(shape.num_blocks, generator=gen)[: shape.num_request_blocks].tolist()


# ------------------------------------------------------------------------------ processes
def _gpu_for(role: str, rank: int, case: Case) -> int:
    """Every rank on GPU 0 (CUDA IPC is within one device here), except over NCCL, which
    refuses two ranks on one device: there, prefill ranks first, then decode ranks, one
    GPU each."""
    if case.backend != "nccl" or case.transport != "dist":
        return 0
    return rank if role == "prefill" else case.prefill_tp + rank


def _connect(local_id: str, role: str, store_port: int, case: Case, secret: bytes):
    """This rank's client of the parent's store, and its DistTransport for dist cases."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=60))
    if case.transport != "dist":
        return store, None
    from kvtransfer.dist import DistTransport

    return store, DistTransport(local_id, role, store, backend=case.backend, timeout_s=60,
                                secret=secret)


def _prefill(rank: int, case: Case, shape: ModelShape, seed: int, store_port: int,
             device: str, secret: bytes, out_dir: str) -> None:
    import msgspec

    from kvtransfer.device_staging import DeviceArena, LayerwiseStager
    from kvtransfer.device_transfer import describe, lend_over_ipc, send_over_dist

    result: dict[str, object] = {"role": "prefill", "rank": rank}
    try:
        if device == "cuda":
            torch.cuda.set_device(_gpu_for("prefill", rank, case))
        heads = kv_heads_of_rank(shape.num_kv_heads, case.prefill_tp, rank)
        caches = vllm_cuda_kv_caches(shape, heads.count, device)
        for kv, full in zip(caches.values(), global_kv(shape, seed)):
            kv.copy_(full[:, heads.start : heads.start + heads.count].to(device))  # "computed"
        src_ids = request_blocks(shape, seed + 1)
        arena = DeviceArena(64 << 20, device=device)
        stager = LayerwiseStager(arena, caches)
        slab = stager.begin(f"req-{rank}", src_ids)
        assert slab is not None, "arena too small for the harness request"
        for name, kv in caches.items():  # each layer as soon as it is "computed"
            stager.save_layer(slab, name, kv)
        stager.finish(slab)
        store, dist = _connect(f"prefill-{rank}", "prefill", store_port, case, secret)
        slices = plan_head_slices(shape.num_kv_heads, shape.head_size, shape.block_size,
                                  case.prefill_tp, rank, case.decode_tp)
        if case.transport == "cuda_ipc":
            # One descriptor per decode rank (each is opened exactly once), all lent before
            # the first ack, so the slab stays LENT until the last rank holds its copy.
            for s in slices:
                desc = lend_over_ipc(arena, slab, caches, len(src_ids), stream=stager.stream)
                store.set(f"harness/{s.decode_rank}/desc", msgspec.msgpack.encode(desc))
            for s in slices:
                store.wait([f"harness/{s.decode_rank}/ack"])
                epoch, sequence = msgspec.msgpack.decode(store.get(f"harness/{s.decode_rank}/ack"))
                arena.ack(epoch, sequence)
        else:
            desc = msgspec.msgpack.encode(describe(slab, caches, len(src_ids)))
            for s in slices:
                store.set(f"harness/{s.decode_rank}/desc", desc)
            send_over_dist(dist, arena, slab, [(f"decode-{s.decode_rank}", f"harness-{s.decode_rank}")
                                               for s in slices])
        result.update(ok=True, arena_used_after=arena.used_bytes,
                      arena_high_water=arena.high_water_bytes, slab_state=slab.state.name)
        if dist is not None:
            dist.close()
    except BaseException as e:  # reported to the parent, which fails the case
        result.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    Path(out_dir, f"prefill-{rank}.json").write_text(json.dumps(result))


def _decode(rank: int, case: Case, shape: ModelShape, seed: int, store_port: int,
            device: str, secret: bytes, out_dir: str) -> None:
    import msgspec

    from kvtransfer.device_transfer import SlabDescriptor, load_from_dist, load_from_ipc

    result: dict[str, object] = {"role": "decode", "rank": rank}
    try:
        if device == "cuda":
            torch.cuda.set_device(_gpu_for("decode", rank, case))
        heads = kv_heads_of_rank(shape.num_kv_heads, case.decode_tp, rank)
        caches = vllm_cuda_kv_caches(shape, heads.count, device)
        prefill_rank = rank // (case.decode_tp // case.prefill_tp)
        (head_slice,) = [s for s in plan_head_slices(shape.num_kv_heads, shape.head_size,
                                                     shape.block_size, case.prefill_tp,
                                                     prefill_rank, case.decode_tp)
                         if s.decode_rank == rank]
        sliced = head_slice if case.decode_tp > case.prefill_tp else None
        dst_ids = request_blocks(shape, seed + 2)  # its own blocks, unlike the prefill's
        store, dist = _connect(f"decode-{rank}", "decode", store_port, case, secret)
        key = f"harness/{rank}"
        store.wait([f"{key}/desc"])
        desc = msgspec.msgpack.decode(store.get(f"{key}/desc"), type=SlabDescriptor)
        started = time.perf_counter()
        if case.transport == "cuda_ipc":
            load_from_ipc(desc, caches, dst_ids, sliced, HEADS_AXIS_VLLM)
            store.set(f"{key}/ack", msgspec.msgpack.encode([desc.epoch, desc.sequence]))
        else:
            load_from_dist(dist, f"prefill-{prefill_rank}", f"harness-{rank}", desc, caches,
                           dst_ids, sliced, HEADS_AXIS_VLLM)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        # Block-exact check against what the prefill computed (regenerated here).
        src_ids = request_blocks(shape, seed + 1)
        mismatched = 0
        untouched = [b for b in range(shape.num_blocks) if b not in dst_ids]
        for kv, full in zip(caches.values(), global_kv(shape, seed)):
            mine = full[:, heads.start : heads.start + heads.count]
            got = kv.cpu()
            for d, s in zip(dst_ids, src_ids):
                if not torch.equal(got[d].view(torch.uint8), mine[s].contiguous().view(torch.uint8)):
                    mismatched += 1
            if got[untouched].count_nonzero() != 0:
                mismatched += 1
        result.update(ok=mismatched == 0, num_blocks_checked=len(dst_ids) * len(caches),
                      mismatched=mismatched, load_s=elapsed, heads=[heads.start, heads.count])
        if dist is not None:
            dist.close()
    except BaseException as e:
        result.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    Path(out_dir, f"decode-{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: Case, shape: ModelShape = ModelShape(), device: str = "cpu", seed: int = 0,
             timeout_s: float = 180.0) -> dict[str, object]:
    """Run one case in fresh processes; returns its result (block_exact True when every
    decode rank found every block exact and nothing else touched)."""
    import multiprocessing as mp
    import tempfile

    from torch.distributed import TCPStore

    started = time.perf_counter()
    port = _free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=timeout_s),
                     wait_for_workers=False)
    secret = secrets.token_bytes(32)  # this run's: the pair groups authenticate with it
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="pdserve-harness-") as out_dir:
        procs = [ctx.Process(target=_prefill, args=(r, case, shape, seed, port, device, secret, out_dir))
                 for r in range(case.prefill_tp)]
        procs += [ctx.Process(target=_decode, args=(r, case, shape, seed, port, device, secret, out_dir))
                  for r in range(case.decode_tp)]
        env_backup = os.environ.get("PYTHONPATH")
        root = str(Path(__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = root + (os.pathsep + env_backup if env_backup else "")
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout_s
            for p in procs:
                p.join(max(0.1, deadline - time.monotonic()))
            hung = [p for p in procs if p.is_alive()]
            for p in hung:
                p.kill()
                p.join(5)
        finally:
            if env_backup is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = env_backup
        ranks = [json.loads(f.read_text()) for f in sorted(Path(out_dir).glob("*.json"))]
    del store
    decodes = [r for r in ranks if r["role"] == "decode"]
    block_exact = (not hung and len(ranks) == len(procs) and all(r.get("ok") for r in ranks))
    return {"case": case.name, **asdict(case), "device": device, "shape": asdict(shape),
            "block_exact": block_exact, "hung": len(hung),
            "num_blocks_checked": sum(r.get("num_blocks_checked", 0) for r in decodes),
            "mismatched": sum(r.get("mismatched", 0) for r in decodes),
            "ranks": ranks, "seconds": time.perf_counter() - started}


def default_cases(device: str) -> list[Case]:
    """Equal TP and decode TP > prefill TP, over every transport this machine can run."""
    shapes = [(1, 1), (1, 2), (2, 4)]
    if device == "cpu":
        return [Case(p, d, "dist", "gloo") for p, d in shapes]
    cases = [Case(p, d, "cuda_ipc") for p, d in shapes]
    cases += [Case(p, d, "dist", "gloo") for p, d in shapes[:2]]  # the CPU path, on this box
    if torch.cuda.device_count() >= 2:
        # NCCL refuses two ranks on one device: only with two GPUs (each rank takes its own).
        cases += [Case(1, 1, "dist", "nccl")]
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtransfer.harness", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--timeout-s", type=float, default=180.0, help="per case")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    results = []
    for case in default_cases(args.device):
        res = run_case(case, device=args.device, timeout_s=args.timeout_s)
        results.append(res)
        print(f"{res['case']:<28} block-exact={res['block_exact']} blocks={res['num_blocks_checked']} "
              f"mismatched={res['mismatched']} {res['seconds']:.1f}s", flush=True)
        for r in res["ranks"]:
            if not r.get("ok"):
                print(f"  {r['role']} {r['rank']}: {r.get('error')}\n{r.get('traceback', '')}",
                      file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"harness": results}, indent=2))
    return 0 if all(r["block_exact"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
