"""The connector's device path on a GPU: its worker halves over CUDA IPC, prefill and decode
in two processes (issue 15). vLLM-free (the GPU check's machine has no vLLM): the worker
halves (`worker_side.ProducerWorker` / `ConsumerWorker`) are what the connector's
`save_kv_layer`, `wait_for_save` and `start_load_kv` call, driven here with the same
`SaveSpec` / `LoadSpec` the scheduler half builds (tests/kvtransfer/test_kv_device_connector.py
drives the full connector on the CPU). Skips without CUDA; bench/gpu_check.sh runs it.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from cluster.config import KVTransferSettings
from kvtransfer.device_path import staging_medium
from kvtransfer.harness import ModelShape, vllm_cuda_kv_caches
from kvtransfer.names import SLAB_PREFIX, segment_path
from kvtransfer.params import ConnectorSettings, StagedKV
from kvtransfer.service import ConsumerService, ProducerService
from kvtransfer.specs import LoadSpec, SaveSpec
from kvtransfer.worker_side import ConsumerWorker, KVCaches, ProducerWorker, TransferRecorder
from tests.kvtransfer.conftest import wait_until

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPE = ModelShape(num_layers=4, num_kv_heads=8, head_size=64, block_size=16, num_blocks=32)
NUM_PROMPT_TOKENS = 40
SRC_BLOCKS = (5, 1, 9)
DST_BLOCKS = (7, 2, 10)


def _decode_process(params: dict, settings_extra: dict, out_path: str) -> None:
    """The decode's worker half in its own process (CUDA IPC cannot open its own handle)."""
    caches = vllm_cuda_kv_caches(SHAPE, SHAPE.num_kv_heads, "cuda")
    recorder = TransferRecorder()
    consumer = ConsumerWorker(KVCaches(caches, SHAPE.block_size), recorder,
                              ConnectorSettings.from_extra_config(settings_extra))
    staged = StagedKV.from_params(params)
    consumer.load(LoadSpec(request_id="r", segment_path=staged.segment_path,
                           dst_block_ids=DST_BLOCKS, first_block=0, slab=staged.slab,
                           slab_transport=staged.slab_transport))
    torch.cuda.synchronize()
    torch.save({"failed": sorted(consumer.take_failed_block_ids()),
                "records": recorder.take_records(),
                "caches": {name: kv.cpu() for name, kv in caches.items()}}, out_path)
    consumer.close()


def test_the_connector_stages_on_the_device_and_a_decode_loads_over_cuda_ipc(tmp_path: Path):
    settings = KVTransferSettings(staging_dir=tmp_path, transport="cuda_ipc", device_staging_gib=0.25)
    service = ProducerService("prefill", settings, "127.0.0.1", sweep=False)
    conn = ConnectorSettings.from_settings(settings, tmp_path)
    assert staging_medium(conn, cache_is_cuda=True) == "device"
    torch.manual_seed(0)
    caches = vllm_cuda_kv_caches(SHAPE, SHAPE.num_kv_heads, "cuda")
    for kv in caches.values():
        kv.copy_(torch.randn(kv.shape, dtype=kv.dtype, device="cuda"))
    recorder = TransferRecorder()
    producer = ProducerWorker(conn, tmp_path, service.engine_id, KVCaches(caches, SHAPE.block_size),
                              recorder, medium="device")
    try:
        path = str(segment_path(tmp_path, service.engine_id, "r"))
        for block_ids, first_block, end_token in (((5, 1), 0, 20), (SRC_BLOCKS, 1, 40)):
            saves = [SaveSpec("r", path, block_ids, first_block, end_token, NUM_PROMPT_TOKENS)]
            for name, kv in caches.items():  # save_kv_layer, right after each layer
                producer.save_layer(saves, name, kv)
            producer.finish_step(saves)  # wait_for_save
        assert not Path(path).exists()  # no host segment: the KV stayed on the GPU
        handle = service.handle_for(StagedKV(segment_path=path, num_tokens=NUM_PROMPT_TOKENS).to_params())
        kv = ConsumerService(settings).materialize(handle)
        assert kv.staged.slab_transport == "cuda_ipc"

        out = tmp_path / "decode.pt"
        proc = mp.get_context("spawn").Process(
            target=_decode_process, args=(kv.kv_transfer_params, conn.to_extra_config(), str(out)))
        proc.start()
        proc.join(timeout=180)
        assert proc.exitcode == 0
        result = torch.load(out)
        assert result["failed"] == []
        assert [(r["direction"], r["transport"], r["outcome"]) for r in result["records"]] == [
            ("load", "cuda_ipc", "ok")]
        for name, src in caches.items():
            got = result["caches"][name]
            for s, d in zip(SRC_BLOCKS, DST_BLOCKS):
                assert torch.equal(got[d].view(torch.uint8), src[s].cpu().contiguous().view(torch.uint8))
        arena = producer.device.arena
        assert wait_until(lambda: arena.used_bytes == 0, timeout_s=10)  # acked: FREE again
        assert list(tmp_path.glob(SLAB_PREFIX + "*")) == []
    finally:
        producer.close()
        service.close()
