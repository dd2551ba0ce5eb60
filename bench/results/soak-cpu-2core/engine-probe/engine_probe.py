"""Where the vLLM engine processes of a real PrefillWorker + DecodeWorker grow (no Ray): 4
closed-loop clients, prefill -> handoff -> decode over real ChannelServer/ChannelClient pairs
as the router does, 150-token prompts, 32 output tokens. Prints the RSS of each engine
process (EngineCore, Worker; P = prefill's, D = decode's) every WARM/10 requests and the
/proc/PID/smaps mappings that grew. With sitecustomize.py from this folder on PYTHONPATH and
LEAKPROBE=1, SIGUSR2 reaches every engine process: LEAKMODE=trim -> gc + malloc_trim and a
report; otherwise start tracemalloc, then snapshot (MEASURE more requests, traced).

    LEAKMODE=trim LEAKPROBE=1 PYTHONPATH=bench/results/soak-cpu-2core/engine-probe WARM=10000 \
        .venv/bin/python bench/results/soak-cpu-2core/engine-probe/engine_probe.py
"""
from __future__ import annotations
import asyncio, os, signal, sys, tempfile, time, tracemalloc, glob
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[3]))
LEAKDIR = Path(os.environ.get("LEAKDIR", "/tmp/pdserve-engine-probe"))
if __name__ == "__main__":
    tracemalloc.stop()
import psutil

WARM = int(os.environ.get("WARM", "1500"))
MEASURE = int(os.environ.get("MEASURE", "3000"))
CONC = int(os.environ.get("CONC", "4"))
MAX_TOKENS = int(os.environ.get("MAX_TOKENS", "32"))
PROMPT_LEN = int(os.environ.get("PROMPT_LEN", "150"))
PREFIX = os.environ.get("PREFIX", "1") == "1"
KVGIB = int(os.environ.get("KVGIB", "1"))
LEAKDIR.mkdir(exist_ok=True)


def engine_cores():
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
            if "VLLM" in title or "EngineCore" in title:
                out[p.pid] = (title.split()[0][:24], sorted(os.sched_getaffinity(p.pid)))
        except Exception:
            pass
    return out


def rss(pid):
    return psutil.Process(pid).memory_info().rss / 2**20


async def main():
    from cluster.config import KVTransferSettings, ModelConfig, PoolConfig
    from cluster.engine_host import EngineSpec
    from cluster.tiny_model import ensure_tiny_model
    from cluster.wire import EngineRequest, SamplingSpec
    from decode_worker.worker import DecodeWorker
    from prefill_worker.worker import PrefillWorker
    from cluster.channel import ChannelClient, ChannelServer

    model_path = ensure_tiny_model("tiny")
    cores = sorted(os.sched_getaffinity(0))
    staging = Path(tempfile.mkdtemp(prefix="leak-kv-", dir="/dev/shm"))

    def spec(c):
        return EngineSpec(model_path=model_path, model=ModelConfig(max_model_len=2048),
                          pool=PoolConfig(num_instances=1, cpu_cores=[c], kv_cache_gib=KVGIB, max_num_seqs=64,
                                          enable_prefix_caching=PREFIX), instance_index=0)
    kv = KVTransferSettings(staging_dir=staging, lease_s=60)
    workers = {"prefill": PrefillWorker("prefill-0", spec([cores[0]]), kv),
               "decode": DecodeWorker("decode-0", spec([cores[-1]]), kv, role="decode")}
    for w in workers.values():
        await w.start()
    clients, servers = {}, []
    for role, w in workers.items():
        s = ChannelServer(w, "127.0.0.1", 0, secret=None)
        servers.append(s)
        clients[role] = ChannelClient(await s.start())
    ecs = engine_cores()
    role_of = {}
    for pid, (t, aff) in ecs.items():
        if "Worker" in t:
            r = "P" if aff == [cores[0]] else "D"
            role_of[pid] = r
            role_of[psutil.Process(pid).ppid()] = r
    names = {pid: f"{role_of.get(pid, '?')}:{t.replace('VLLM::', '')}" for pid, (t, aff) in ecs.items()}
    print("engine cores", names, flush=True)
    counter = 0
    stop = asyncio.Event()

    async def poll():
        while not stop.is_set():
            for c in clients.values():
                await c.stats()
            await asyncio.sleep(0.1)

    async def one(i):
        prompt = tuple(100 + ((i * 7919 + k * 31) % 997) for k in range(PROMPT_LEN))
        rid = f"cmpl-{i:08d}-{os.urandom(4).hex()}"
        res = await clients["prefill"].prefill(EngineRequest(request_id=rid, prompt_token_ids=prompt,
                                               sampling=SamplingSpec(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)))
        req = EngineRequest(request_id=rid, prompt_token_ids=prompt + (res.first_token_id,),
                            sampling=SamplingSpec(max_tokens=MAX_TOKENS - 1, temperature=0.0, ignore_eos=True),
                            kv_handle=res.kv_handle)
        async for d in clients["decode"].generate(req):
            if d.finish_reason is not None:
                break

    async def run(n):
        nonlocal counter
        target = counter + n
        async def loop():
            nonlocal counter
            while counter < target:
                counter += 1
                await one(counter)
        await asyncio.gather(*(loop() for _ in range(CONC)))

    pt = asyncio.create_task(poll())
    t0 = time.time()
    def line(tag):
        print(f"{tag} t={time.time()-t0:.0f}s n={counter} " + " ".join(f"{names[p]}={rss(p):.1f}" for p in ecs), flush=True)
    line("start")
    sys.path.insert(0, str(HERE)); from smaps_diff import maps
    m0 = {p: maps(p) for p in ecs}
    for k in range(10):
        await run(WARM // 10)
        line(f"warm{k}")
    m1 = {p: maps(p) for p in ecs}
    for p in ecs:
        diffs = []
        for key in set(m0[p]) | set(m1[p]):
            d = m1[p].get(key, 0) - m0[p].get(key, 0)
            if abs(d) >= 64: diffs.append((d, key))
        print(names[p], "smaps growth kB:", sorted(diffs, reverse=True)[:8], flush=True)
    if os.environ.get("LEAKMODE") == "trim":
        for p in ecs: os.kill(p, signal.SIGUSR2)
        await asyncio.sleep(3)
        import glob
        for f in glob.glob(str(LEAKDIR / "trim-*.txt")):
            pid = int(f.split("-")[-1][:-4]); print(names.get(pid, pid), open(f).read().strip(), flush=True)
        stop.set(); await pt
        for s in servers: await s.close()
        for w in workers.values(): await w.shutdown()
        return
    for p in ecs: os.kill(p, signal.SIGUSR2)  # start tracing
    await run(200)
    for p in ecs: os.kill(p, signal.SIGUSR2)  # snapshot 1
    await asyncio.sleep(3)
    line("snap1")
    step = MEASURE // 6
    for k in range(6):
        await run(step)
        line(f"step{k}")
    for p in ecs: os.kill(p, signal.SIGUSR2)
    await asyncio.sleep(5)
    stop.set(); await pt
    for s in servers: await s.close()
    for w in workers.values(): await w.shutdown()
    print("names", names)

if __name__ == "__main__":
    asyncio.run(main())
