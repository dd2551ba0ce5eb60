"""Probe: `fused.py serve --config F --port P`. Configs whose name holds 'fused' run the router
with the colocated engine worker in this process (no worker replica, no channel); others exec pdserve."""
import asyncio, os, sys
from pathlib import Path

def main():
    argv = sys.argv[1:]
    cfg = Path(argv[argv.index("--config") + 1]); port = int(argv[argv.index("--port") + 1])
    if "fused" not in cfg.name:
        os.execv(sys.executable, [sys.executable, "-m", "pdserve.cli", *argv])
    import uvicorn
    from cluster.config import load_config
    from cluster.cpu_affinity import pin_front_end
    from cluster.engine_host import EngineSpec
    from decode_worker.worker import DecodeWorker
    from pdserve.launcher import resolve_model_path, served_model_name
    from router.build import build_router
    from router.tokenizer import ModelTokenizer
    config = load_config(cfg, {"router": {"port": port}})
    pin_front_end(config.ray.front_end_cores)
    model_path = resolve_model_path(config)
    pool = config.pools()["colocated"]
    async def run():
        w = DecodeWorker("colocated-0", EngineSpec(model_path=model_path, model=config.model, pool=pool, instance_index=0),
                         config.kv_transfer, "colocated")
        await w.start()
        app, _ = build_router(config, ModelTokenizer(model_path, config.model.max_model_len),
                              served_model_name(config, model_path), colocated=[w])
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        try:
            await server.serve()
        finally:
            await w.shutdown()
    asyncio.run(run())

if __name__ == "__main__":
    main()
