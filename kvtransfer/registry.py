"""KV transports: the interface and the lazy registry that maps names to implementations.

A transport takes a `TransferDescriptor` (what the prefill's handle says) and returns a
local segment file that the decode's connector can load, plus the segment's size in bytes.
Which transport serves a (prefill, decode) pair is chosen per handle by
`ConsumerService` from `KVTransferSettings.transport`; the implementations live in
`host_transports.py` (shm, tcp), `dist_channel.py` (dist) and `cuda_ipc.py`.

| name       | reaches              | how                                                              |
|------------|----------------------|------------------------------------------------------------------|
| `shm`      | this host            | the producer's segment is already here: checked, used in place   |
| `tcp`      | any host             | `tcp.fetch_segment` from the producer node's `TransferServer`    |
| `dist`     | one rendezvous store | `dist.DistTransport.recv_segment` over a (prefill, decode) group |
| `cuda_ipc` | this host, one GPU   | the device path (`device_staging.py`); not on the host path      |

Names map to ``"module:attribute"`` strings naming a factory
``(settings, consumer_id) -> Transport`` (a class with that constructor is one). A target is
imported on first use only, so importing `kvtransfer` never imports torch.distributed or
CUDA code; `register_transport` adds plug-ins (or, with ``replace=True``, swaps a built-in
for a fake in tests; `kvtransfer.testing.LoopbackTransport` is the shipped fake).
`TransportRegistry` instances other than the module's `TRANSPORTS` keep tests and plug-ins
from touching the built-in table.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cluster.config import KVTransferSettings
from kvtransfer.handle import TransferDescriptor


class Transport(Protocol):
    """One way for a consumer to make a staged segment local."""

    name: str
    is_local: bool  # reaches only segments on the consumer's own host (same node id)

    def fetch(self, desc: TransferDescriptor, dest_dir: Path, timeout_s: float) -> tuple[Path, int]:
        """A local path holding the complete segment, and the segment's bytes (from its
        header; the file may be larger). The caller's connector loads and then recycles it.
        Raises KVTransferError, and leaves nothing in `dest_dir`, on any failure."""
        ...

    def close(self) -> None: ...


TransportFactory = Callable[[KVTransferSettings, str], Transport]  # (settings, consumer id)


class TransportRegistry:
    """Transport names -> factories, imported from their "module:attribute" on first use."""

    def __init__(self, targets: dict[str, str] | None = None):
        self._targets: dict[str, str] = {}
        self._resolved: dict[str, TransportFactory] = {}
        self._lock = threading.Lock()
        for name, target in (targets or {}).items():
            self.register(name, target)

    def register(self, name: str, target: str, *, replace: bool = False) -> None:
        """Make `name` resolve to `target` ("package.module:factory"); not imported yet."""
        module, sep, attribute = target.partition(":")
        if not name or not sep or not module or not attribute:
            raise ValueError(f"transport target must look like 'package.module:factory', "
                             f"got {target!r} for {name!r}")
        with self._lock:
            if name in self._targets and not replace:
                raise ValueError(f"KV transport {name!r} is already registered "
                                 f"({self._targets[name]}); pass replace=True to override it")
            self._targets[name] = target
            self._resolved.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._targets)

    def get(self, name: str) -> TransportFactory:
        """The factory registered as `name`, importing its module now if it is the first use."""
        with self._lock:
            factory = self._resolved.get(name)
            target = self._targets.get(name)
        if factory is not None:
            return factory
        if target is None:
            raise ValueError(f"unknown KV transport {name!r}; known: {', '.join(self.names())}")
        module_name, _, attribute = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"KV transport {name!r}: cannot load {target}: {e}") from e
        with self._lock:
            if self._targets.get(name) == target:  # not replaced while we were importing
                self._resolved[name] = factory
        return factory


TRANSPORTS = TransportRegistry({
    "shm": "kvtransfer.host_transports:ShmTransport",
    "tcp": "kvtransfer.host_transports:TcpTransport",
    "dist": "kvtransfer.dist_channel:DistFetchTransport",
    "cuda_ipc": "kvtransfer.cuda_ipc:make_transport",
})


# Transports that can move device memory: the device path (`device_path.py`) is taken only
# where a decode will reach the prefill over one of these (cuda_ipc on one host; dist,
# NCCL or gloo, anywhere in the rendezvous). shm and tcp move host segments only.
DEVICE_TRANSPORTS: frozenset[str] = frozenset({"cuda_ipc", "dist"})


def is_device_transport(name: str) -> bool:
    return name in DEVICE_TRANSPORTS


def register_transport(name: str, target: str, *, replace: bool = False) -> None:
    TRANSPORTS.register(name, target, replace=replace)


def get_transport(name: str) -> TransportFactory:
    return TRANSPORTS.get(name)
