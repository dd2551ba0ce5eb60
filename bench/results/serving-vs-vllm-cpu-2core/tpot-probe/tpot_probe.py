"""Where a lone request's TPOT goes on the small model (no Ray, no router): the decode
engine's inter-token gaps, measured at the caller of each engine, in three set-ups.

  MODE=raw   one AsyncLLM with vLLM's own defaults and CPU binding (caller unpinned).
  MODE=vllm  one engine (EngineHost, no KV connector) on core 1; the caller on core 0.
             Each request is prefilled and decoded there, as in plain `vllm serve`.
  MODE=pd    PrefillWorker on core 0, DecodeWorker on core 1, over real ChannelServer /
             ChannelClient pairs as the router uses them; the caller on core 0.
PATTERN=seq: N requests one after another (nothing else runs during a decode).
PATTERN=rate: Poisson arrivals at RATE req/s (prefills overlap decodes in MODE=pd).
Prompts: PLEN_LO..PLEN_HI random token ids (seed 0), OUT output tokens, greedy, ignore_eos.

    MODE=pd PATTERN=seq .venv/bin/python bench/results/serving-vs-vllm-cpu-2core/tpot-probe/tpot_probe.py
"""
from __future__ import annotations
import asyncio, os, random, statistics, sys, tempfile, time
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[3]))

MODE = os.environ.get("MODE", "pd")
PATTERN = os.environ.get("PATTERN", "seq")
N = int(os.environ.get("N", "20"))
RATE = float(os.environ.get("RATE", "0.5"))
OUT = int(os.environ.get("OUT", "64"))
PLEN_LO, PLEN_HI = int(os.environ.get("PLEN_LO", "512")), int(os.environ.get("PLEN_HI", "1536"))
MODEL = os.environ.get("MODEL", "small")


def summary(tag, rows):
    tpots = [r["tpot"] * 1e3 for r in rows]
    ttfts = [r["ttft"] * 1e3 for r in rows]
    gaps = sorted(g * 1e3 for r in rows for g in r["gaps"])
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]
    print(f"{tag}: n={len(rows)} TPOT p50 {statistics.median(tpots):.2f} p90 {q(sorted(tpots), .9):.2f} ms | "
          f"TTFT p50 {statistics.median(ttfts):.1f} ms | gaps p10 {q(gaps, .1):.2f} p50 {q(gaps, .5):.2f} "
          f"p90 {q(gaps, .9):.2f} p99 {q(gaps, .99):.2f} ms", flush=True)
    for r in rows:
        print(f"  plen={r['plen']:5d} ttft={r['ttft']*1e3:7.1f} tpot={r['tpot']*1e3:6.2f} "
              f"first8={[round(g*1e3,1) for g in r['gaps'][:8]]}", flush=True)


async def main():
    from cluster.config import KVTransferSettings, ModelConfig, PoolConfig
    from cluster.engine_host import EngineHost, EngineSpec, to_sampling_params
    from cluster.tiny_model import ensure_tiny_model
    from cluster.wire import EngineRequest, SamplingSpec

    if MODE != "raw":
        os.sched_setaffinity(0, {0})
    model_path = ensure_tiny_model(MODEL)
    rng = random.Random(0)
    prompts = []
    for i in range(N):
        n = rng.randint(PLEN_LO, PLEN_HI)
        prompts.append(tuple(rng.randint(100, 1800) for _ in range(n)))

    def spec(c):
        return EngineSpec(model_path=model_path, model=ModelConfig(max_model_len=2048),
                          pool=PoolConfig(num_instances=1, cpu_cores=[c], kv_cache_gib=2), instance_index=0)

    closers = []
    if MODE in ("vllm", "raw"):
        if MODE == "vllm":
            host = EngineHost(spec([1]))
            await host.start()
            closers.append(host.shutdown)
        else:  # vLLM's own defaults, default CPU binding, nothing from pdserve
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = "2"
            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(model_path), max_model_len=2048, seed=0))
            closers.append(engine.shutdown)

            class host:
                @staticmethod
                async def stream(rid, ids, sp):
                    from vllm.inputs import TokensPrompt
                    async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), sp, rid):
                        yield out
        import psutil
        for ch in psutil.Process().children(recursive=True):
            print("child", ch.pid, ch.name(), sorted(os.sched_getaffinity(ch.pid)), ch.nice(), ch.num_threads(), flush=True)

        async def one(i):
            prompt = prompts[i]
            sp = to_sampling_params(SamplingSpec(max_tokens=OUT, temperature=0.0, ignore_eos=True))
            t0 = time.perf_counter(); stamps = []
            async for out in host.stream(f"r{i}-{os.urandom(3).hex()}", list(prompt), sp):
                now = time.perf_counter()
                stamps.extend([now] * max(1, len(out.outputs[0].token_ids)))
            return t0, stamps
    else:
        from cluster.channel import ChannelClient, ChannelServer
        from decode_worker.worker import DecodeWorker
        from prefill_worker.worker import PrefillWorker
        staging = Path(tempfile.mkdtemp(prefix="tpot-kv-", dir="/dev/shm"))
        kv = KVTransferSettings(staging_dir=staging, lease_s=60)
        workers = {"prefill": PrefillWorker("prefill-0", spec([0]), kv),
                   "decode": DecodeWorker("decode-0", spec([1]), kv, role="decode")}
        for w in workers.values():
            await w.start()
        clients, servers = {}, []
        for role, w in workers.items():
            s = ChannelServer(w, "127.0.0.1", 0, secret=None)
            servers.append(s)
            clients[role] = ChannelClient(await s.start())

        async def one(i):
            prompt = prompts[i]
            rid = f"cmpl-{i:06d}-{os.urandom(4).hex()}"
            t0 = time.perf_counter()
            res = await clients["prefill"].prefill(EngineRequest(
                request_id=rid, prompt_token_ids=prompt,
                sampling=SamplingSpec(max_tokens=OUT, temperature=0.0, ignore_eos=True)))
            stamps = [time.perf_counter()]
            req = EngineRequest(request_id=rid, prompt_token_ids=prompt + (res.first_token_id,),
                                sampling=SamplingSpec(max_tokens=OUT - 1, temperature=0.0, ignore_eos=True),
                                kv_handle=res.kv_handle)
            async for d in clients["decode"].generate(req):
                now = time.perf_counter()
                stamps.extend([now] * len(d.token_ids))
                if d.finish_reason is not None:
                    break
            return t0, stamps

    await one(0)  # warm-up (not counted), as `vllm bench serve` sends one test prompt first
    rows = []

    async def record(i):
        t0, stamps = await one(i)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        rows.append(dict(plen=len(prompts[i]), ttft=stamps[0] - t0,
                         tpot=(stamps[-1] - stamps[0]) / max(1, len(stamps) - 1), gaps=gaps))

    if PATTERN == "seq":
        for i in range(1, N):
            await record(i)
    else:
        arr = random.Random(1)
        tasks = []
        for i in range(1, N):
            tasks.append(asyncio.create_task(record(i)))
            await asyncio.sleep(arr.expovariate(RATE))
        await asyncio.gather(*tasks)
    summary(f"MODE={MODE} PATTERN={PATTERN} RATE={RATE} model={MODEL}", rows)
    if MODE == "pd":
        for s in servers: await s.close()
        for w in workers.values(): await w.shutdown()
    for c in closers: c()

if __name__ == "__main__":
    asyncio.run(main())
