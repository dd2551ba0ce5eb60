"""No pickle on any pdserve wire.

Pickle-based channels were remote-code-execution CVEs in other disaggregated servers
(whoever can reach the socket runs code). pdserve's own wires are JSON (HTTP), msgspec
msgpack (the worker channel, KV headers, the dist request queue) and raw bytes (KV
payloads). Two proofs: (1) a scan of every pdserve module for pickle-family imports and
pickle-loading calls; (2) a full request over HTTP and the worker channel, plus a TCP KV
fetch, with every pickle entry point patched to raise."""

from __future__ import annotations

import ast
import asyncio
import copyreg
import pickle
from pathlib import Path

import _pickle
import httpx
import pytest

from cluster.channel import ChannelServer, WorkerChannelClient
from cluster.config import RouterConfig, ServeConfig, SLOConfig
from cluster.tiny_model import ensure_tiny_model
from kvtransfer.staging import SegmentLayout, StagingSegment, segment_path
from kvtransfer.tcp import TransferServer, fetch_segment
from router.build import build_router
from router.tokenizer import ModelTokenizer
from tests.fakes import FakeDecodeWorker, FakePrefillWorker, serving

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["cluster", "router", "kvtransfer", "prefill_worker", "decode_worker", "bench", "pdserve"]
FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve",
                     "joblib", "ray.cloudpickle", "multiprocessing.reduction"}
# Calls that unpickle unless told otherwise: torch.load (weights_only=False), np.load with
# allow_pickle, pandas.read_pickle.
FORBIDDEN_CALLS = {"load", "read_pickle"}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py"))


def test_no_pdserve_module_imports_pickle_or_loads_pickles():
    offenders = []
    for path in _modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name in FORBIDDEN_MODULES or name.split(".")[0] in FORBIDDEN_MODULES - {"ray.cloudpickle"}:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {name}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if (node.func.attr in FORBIDDEN_CALLS and isinstance(owner, ast.Name)
                        and owner.id in {"torch", "np", "numpy", "pd", "pandas"}):
                    keywords = {k.arg: k.value for k in node.keywords}
                    safe = (owner.id == "torch" and isinstance(keywords.get("weights_only"), ast.Constant)
                            and keywords["weights_only"].value is True)
                    if not safe:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                                         f"{owner.id}.{node.func.attr}(...)")
    assert len(_modules()) > 50  # the scan saw the code base
    assert offenders == []


@pytest.fixture
def no_pickle(monkeypatch):
    """Every pickle entry point raises (the pure-Python and the C implementation)."""
    calls: list[str] = []

    def refuse(name: str):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"pickle used on a pdserve wire: {name}")
        return fail

    def refuse_class(module, name: str):
        # Still a class (the stdlib subclasses Pickler at import time), but unusable.
        return type(name, (getattr(module, name),), {"__init__": refuse(f"{module.__name__}.{name}")})

    for module in (pickle, _pickle):
        for name in ("dumps", "loads", "dump", "load"):
            monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
        for name in ("Pickler", "Unpickler"):
            monkeypatch.setattr(module, name, refuse_class(module, name))
    monkeypatch.setattr(copyreg, "__reduce_ex__", refuse("copyreg.__reduce_ex__"), raising=False)
    yield calls
    assert calls == []


async def test_a_full_request_over_http_and_the_worker_channel_never_pickles(no_pickle):
    prefills = [FakePrefillWorker("prefill-0")]
    decodes = [FakeDecodeWorker("decode-0", prefills=prefills)]
    servers = [ChannelServer(w) for w in prefills + decodes]
    addresses = [await s.start() for s in servers]
    clients = [WorkerChannelClient(addresses[0], "prefill-0", "prefill"),
               WorkerChannelClient(addresses[1], "decode-0", "decode")]
    config = ServeConfig(slo=SLOConfig(ttft_s=1.0, tpot_s=0.1),
                         router=RouterConfig(stats_interval_s=0.05))
    app, deps = build_router(config, ModelTokenizer(ensure_tiny_model("tiny")), "pdserve-tiny",
                             prefill=clients[:1], decode=clients[1:])
    try:
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            while (await http.get("/health")).status_code != 200:
                await asyncio.sleep(0.02)
            r = await http.post("/v1/completions", json={"model": "pdserve-tiny",
                                                         "prompt": "no pickles", "max_tokens": 6})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
            r = await http.post("/v1/chat/completions", json={
                "model": "pdserve-tiny", "stream": True, "max_tokens": 5,
                "messages": [{"role": "user", "content": "stream without pickles"}]})
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
            assert (await http.get("/metrics")).status_code == 200
        assert prefills[0].num_prefills == 2 and prefills[0].staged == {}
    finally:
        for c in clients:
            await c.close()
        for s in servers:
            await s.close()


def test_a_tcp_kv_fetch_never_pickles(no_pickle, tmp_path):
    producer_dir, consumer_dir = tmp_path / "p", tmp_path / "c"
    producer_dir.mkdir()
    consumer_dir.mkdir()
    layout = SegmentLayout(layer_names=["l0"], bytes_per_block=[512], num_blocks=2,
                           num_tokens=20, block_size=16)
    src = segment_path(producer_dir, "p0", "r1")
    seg = StagingSegment.create(src, layout)
    seg.mark_complete()
    seg.close()
    server = TransferServer(producer_dir, "e1", host="127.0.0.1").start()
    try:
        dest, nbytes = fetch_segment("127.0.0.1", server.port, src.name, "e1", consumer_dir, 5.0)
        assert dest.exists() and nbytes > 0
    finally:
        server.close()
