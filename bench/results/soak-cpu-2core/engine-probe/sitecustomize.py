"""Loaded by every engine process when this folder is on PYTHONPATH (engine_probe.py)."""
import os
if os.environ.get("LEAKPROBE") == "1":
    import signal, time, tracemalloc
    _DIR = os.environ.get("LEAKDIR", "/tmp/pdserve-engine-probe")

    def _rss():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024

    def _on_usr2(signum, frame):
        if os.environ.get("LEAKMODE") == "trim":
            import ctypes, gc
            before = _rss()
            gc.collect()
            after_gc = _rss()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open(f"{_DIR}/trim-{os.getpid()}.txt", "a") as f:
                f.write(f"{time.time():.0f} rss {before:.1f} -> gc {after_gc:.1f} -> malloc_trim {_rss():.1f}\n")
            return
        if not tracemalloc.is_tracing():
            tracemalloc.start(int(os.environ.get("LEAKFRAMES", "10")))
            return
        tracemalloc.take_snapshot().dump(f"{_DIR}/snap-{os.getpid()}-{time.time():.0f}.pkl")

    def _install():
        try:
            signal.signal(signal.SIGUSR2, _on_usr2)
        except ValueError:
            pass

    os.register_at_fork(after_in_child=_install)
    _install()
