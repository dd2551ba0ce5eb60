"""The peer deployment: plain vLLM's OpenAI server on the same model, dtype and cores.

`pdserve bench compare --target vllm=vllm` starts

    VLLM_TARGET_DEVICE=cpu python -m vllm.entrypoints.openai.api_server --model DIR \\
        --served-model-name NAME --dtype DTYPE --host 127.0.0.1 --port P ...

with the model directory, served name, dtype, context length, sequence cap, prefix-cache
setting and seed that pdserve would use for the mirrored deployment config (the embedded
model is built by `cluster.tiny_model.ensure_tiny_model`, exactly as `pdserve serve` does),
and the same total KV-cache space (`VLLM_CPU_KVCACHE_SPACE`, GiB).

Core binding (`VLLM_CPU_OMP_THREADS_BIND`, read by vLLM's CPU worker):
- `default`: vLLM's own `auto` binding. On x86 it reserves one core per engine rank for
  the scheduler/front-end processes and binds the engine's OpenMP threads to the rest:
  on a 2-core host, the engine computes on one core and the API server and engine-core
  busy loop share the other. This is what a user gets from `vllm serve`.
- `cores=0-1` (any vLLM CPU list): the engine's OpenMP threads on those cores (both
  cores on this host); the front end then shares them.
The whole server process tree is limited to `cpus` (default: the cores this process may
run on) with `sched_setaffinity`, so the peer never gets more cores than pdserve does.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import BenchError

_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
DEFAULT_BINDING = "default"


def parse_cpu_list(text: str) -> list[int]:
    """'0-1,3' -> [0, 1, 3]; BenchError on anything else."""
    if not _CPU_LIST.match(text):
        raise BenchError(f"not a CPU list: {text!r} (e.g. 0-1 or 0,1)")
    cores: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(cores))


@dataclass(frozen=True)
class VllmPeer:
    """Settings of one plain-vLLM OpenAI server."""

    model_path: Path
    served_model_name: str
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    block_size: int | None = None
    seed: int = 0
    kv_cache_gib: float = 1.0
    binding: str = DEFAULT_BINDING  # "default" (vLLM's auto) or a CPU list for the engine
    cpus: tuple[int, ...] = ()  # affinity of the whole server; () = this process's cores
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.binding != DEFAULT_BINDING:
            parse_cpu_list(self.binding)

    @property
    def affinity(self) -> list[int]:
        return list(self.cpus) if self.cpus else sorted(os.sched_getaffinity(0))

    @property
    def num_cores(self) -> int:
        return len(self.affinity)

    def describe(self) -> str:
        bind = ("vLLM default binding (auto: engine on all but one reserved core)"
                if self.binding == DEFAULT_BINDING else f"engine threads bound to {self.binding}")
        return (f"plain vLLM OpenAI server, {self.served_model_name} ({self.dtype}), "
                f"{bind}, cores {','.join(map(str, self.affinity))}")

    def argv(self, port: int, host: str = "127.0.0.1") -> list[str]:
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_path), "--served-model-name", self.served_model_name,
                "--dtype", self.dtype, "--host", host, "--port", str(port),
                "--seed", str(self.seed)]
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        if self.max_num_seqs is not None:
            argv += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.max_num_batched_tokens is not None:
            argv += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.block_size is not None:
            argv += ["--block-size", str(self.block_size)]
        argv.append("--enable-prefix-caching" if self.enable_prefix_caching
                    else "--no-enable-prefix-caching")
        return [*argv, *self.extra_args]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["VLLM_TARGET_DEVICE"] = "cpu"
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{self.kv_cache_gib:g}"
        if self.binding == DEFAULT_BINDING:
            env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.binding
        return env


def _model_path(config) -> Path:
    """The directory `pdserve serve` loads for `config` (same rule as its launcher)."""
    if config.model.path is not None:
        path = Path(config.model.path).expanduser()
        if not (path / "config.json").exists():
            raise BenchError(f"model.path: {path} is not a Hugging Face model directory")
        return path
    from cluster.tiny_model import ensure_tiny_model

    return ensure_tiny_model(config.model.embedded)


def served_model_name(config, model_path: Path) -> str:
    """The model id `pdserve serve` answers to for `config` (same rule as its launcher)."""
    if config.model.served_model_name:
        return config.model.served_model_name
    if config.model.path is None:
        return f"pdserve-{config.model.embedded}"
    return model_path.name


def peer_from_config(config, binding: str = DEFAULT_BINDING, cpus: tuple[int, ...] = (),
                     extra_args: tuple[str, ...] = ()) -> VllmPeer:
    """The vLLM server equivalent to a pdserve `ServeConfig`'s model and engine settings.

    KV space is the config's total over all instances; the sequence and batch caps are
    those of its first pool (one engine instead of several).
    """
    model_path = _model_path(config)
    pools = config.running_pools()
    first = pools[0] if pools else None
    kv = sum(p.kv_cache_gib * p.num_instances for p in pools) or 1.0
    return VllmPeer(
        model_path=model_path,
        served_model_name=served_model_name(config, model_path),
        dtype=config.model.dtype,
        max_model_len=config.model.max_model_len,
        max_num_seqs=first.max_num_seqs if first else None,
        max_num_batched_tokens=first.max_num_batched_tokens if first else None,
        enable_prefix_caching=first.enable_prefix_caching if first else True,
        block_size=config.model.block_size,
        seed=config.model.seed,
        kv_cache_gib=kv,
        binding=binding,
        cpus=cpus,
        extra_args=extra_args,
    )


def parse_peer_spec(spec: str) -> tuple[str, tuple[int, ...]]:
    """`vllm`, `vllm:default`, `vllm:cores=0-1`, `vllm:cores=0-1:cpus=0-1` -> (binding, cpus)."""
    parts = spec.split(":")
    if parts[0] != "vllm":
        raise BenchError(f"not a vLLM peer: {spec!r}")
    binding, cpus = DEFAULT_BINDING, ()
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if key == "default" and not eq:
            binding = DEFAULT_BINDING
        elif key == "cores" and value:
            parse_cpu_list(value)
            binding = value
        elif key == "cpus" and value:
            cpus = tuple(parse_cpu_list(value))
        else:
            raise BenchError(f"bad vLLM peer option {part!r} in {spec!r} (use vllm, "
                             "vllm:default, vllm:cores=0-1, optionally :cpus=0-1)")
    return binding, cpus
