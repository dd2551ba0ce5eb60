"""Real vLLM engines on the CPU with the connector's device path forced (issue 15).

`kv_transfer.device_path: force` puts a prefill's staging into a device arena on the engine's
own (CPU) cache device: its connector gathers each layer into a slab from vLLM's
`save_kv_layer`, the handle carries the slab ticket, and the decode engine's connector loads
the slab over dist (gloo) in `start_load_kv` and acks it. The same code a CUDA engine runs,
minus CUDA streams and IPC. One prefill and one decode engine on the embedded tiny model
(~30 s each to start); marked `engine`.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from datetime import timedelta

import pytest

from cluster.config import KVTransferSettings, ModelConfig, PoolConfig
from cluster.wire import EngineRequest, SamplingSpec
from kvtransfer.handle import decode_handle
from kvtransfer.names import SLAB_PREFIX, list_segments

pytestmark = pytest.mark.engine

MAX_TOKENS = 8


def _prompt(seed: str, n: int) -> tuple[int, ...]:
    rng = random.Random(seed)  # ids the tiny model's tokenizer knows
    return (0, *(rng.randrange(6, 1800) for _ in range(n - 1)))


def _sampling(max_tokens: int) -> SamplingSpec:
    return SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def _collect(deltas) -> list:
    return [d async for d in deltas]


def test_real_engines_hand_kv_over_through_the_device_path(tmp_path):
    pytest.importorskip("vllm")
    from torch.distributed import TCPStore

    from cluster.engine_host import EngineSpec
    from cluster.tiny_model import ensure_tiny_model
    from decode_worker.worker import DecodeWorker
    from prefill_worker.worker import PrefillWorker

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=60))
    kv = KVTransferSettings(staging_dir=tmp_path, lease_s=60, device_path="force",
                            device_staging_gib=1 / 16, connect_timeout_s=30,
                            dist_store_host="127.0.0.1", dist_store_port=store.port)
    model_path = ensure_tiny_model("tiny")
    model = ModelConfig(max_model_len=2048)
    cores = sorted(os.sched_getaffinity(0))

    def spec(core: int) -> EngineSpec:
        return EngineSpec(model_path=model_path, model=model,
                          # No prefix cache: the baseline below recomputes every prompt
                          # token instead of reusing the KV the transfer loaded.
                          pool=PoolConfig(num_instances=1, cpu_cores=[[core]], kv_cache_gib=1,
                                          max_num_seqs=16, enable_prefix_caching=False),
                          instance_index=0)

    async def run() -> None:
        prefill = PrefillWorker("prefill-dev", spec(cores[0]), kv)
        decode = DecodeWorker("decode-dev", spec(cores[-1]), kv, role="decode")
        try:
            await prefill.start()
            await decode.start()
            for i, prompt_len in enumerate((100, 300)):  # 300: several chunks of blocks
                prompt = _prompt(f"dev-{i}", prompt_len)
                result = await prefill.prefill(EngineRequest(
                    request_id=f"dev-{i}", prompt_token_ids=prompt, sampling=_sampling(MAX_TOKENS)))
                assert result.kv_handle is not None
                assert decode_handle(result.kv_handle).slab is not None  # staged in a slab
                assert list_segments(tmp_path) == []  # nothing through host segments
                full = (*prompt, result.first_token_id)
                deltas = await _collect(decode.generate(EngineRequest(
                    request_id=f"dev-{i}", prompt_token_ids=full,
                    sampling=_sampling(MAX_TOKENS - 1), kv_handle=result.kv_handle)))
                report = [d for d in deltas if d.served_by is not None][-1]  # the last word
                assert report.served_by == "transferred", report
                assert report.num_prompt_tokens_computed == 1  # only the first token's KV
                # The same request with no KV handed over: the decode computes the prompt
                # itself; greedy, so the tokens must be the same.
                baseline = await _collect(decode.generate(EngineRequest(
                    request_id=f"dev-{i}-recompute", prompt_token_ids=full,
                    sampling=_sampling(MAX_TOKENS - 1))))
                tokens = [t for d in deltas for t in d.token_ids]
                assert tokens == [t for d in baseline for t in d.token_ids]
            # Every slab acked: no record left (the prefill engine's responder unlinks it
            # once its send completed, and frees the slab).
            deadline = time.monotonic() + 10
            while list(tmp_path.glob(SLAB_PREFIX + "*")) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert list(tmp_path.glob(SLAB_PREFIX + "*")) == []
        finally:
            await decode.shutdown()
            await prefill.shutdown()

    try:
        asyncio.run(run())
    finally:
        del store
