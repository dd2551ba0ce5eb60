"""The one place that decides between the host path and the device path (docs/kvtransfer.md).

Three decisions, each made here and nowhere else:

    engine   `staging_medium(settings, cache_is_cuda)`: where a prefill's connector stages
             (called once, when vLLM registers the KV caches)
               device_path off                              -> host
               device_path force                            -> device, whatever the cache's
                                                               device (CPU tests run the very
                                                               same code: arena in host memory,
                                                               moved over dist with gloo)
               device_path auto, CPU cache                  -> host (CPU engines: unchanged)
               device_path auto, CUDA cache                 -> device when every decode reaches
                                                               the arena over a device transport
                                                               (`registry.DEVICE_TRANSPORTS`):
                   transport cuda_ipc or dist               -> device
                   transport auto with a rendezvous store   -> device (cuda_ipc on this host,
                                                               dist across hosts)
                   transport auto without a store, shm, tcp -> host
    request  a request whose slab does not fit in the arena (`DeviceArena.allocate` returns
             None), or whose KV several decodes will claim (n > 1: the prefill worker sets
             `params.PARAM_HOST_STAGING`; a slab serves one decode), takes the host path:
             `device_connector.DeviceProducer.gather`
    handle   `device_transport_for(...)`: which device transport a decode loads a slab over

`engine_arena_bytes` is the arena an engine will allocate, for the memory accounting of
`cluster/engine_host.py` (`memory.engine_memory_utilization`). Torch-free and vLLM-free.
"""

from __future__ import annotations

from typing import Any, Literal

from cluster.wire import KVTransferError
from kvtransfer.params import ConnectorSettings
from kvtransfer.registry import is_device_transport

StagingMedium = Literal["host", "device"]


def _has_store(settings: ConnectorSettings) -> bool:
    return settings.dist_store_host is not None and settings.dist_store_port is not None


def _reaches_every_decode_on_device(settings: ConnectorSettings) -> bool:
    if settings.transport == "auto":
        # Decodes on other hosts need dist; without a rendezvous store they could not
        # reach a device arena, and the prefill does not know where its decode will be.
        return _has_store(settings)
    return is_device_transport(settings.transport)


def staging_medium(settings: ConnectorSettings, cache_is_cuda: bool) -> StagingMedium:
    """Where this engine's connector stages a prompt's KV (see the module's table)."""
    if settings.device_path == "off":
        return "host"
    if settings.device_path == "force":
        return "device"
    if not cache_is_cuda:
        return "host"
    return "device" if _reaches_every_decode_on_device(settings) else "host"


def device_transport_for(transport: str, has_store: bool, arena_is_cuda: bool,
                         same_node: bool) -> Literal["cuda_ipc", "dist"]:
    """How a decode loads a slab handle (`transport`: the configured one): CUDA IPC from a
    CUDA arena on its own host (unless dist is forced), dist otherwise. Raises
    KVTransferError when neither reaches it."""
    if transport in ("auto", "cuda_ipc") and same_node and arena_is_cuda:
        return "cuda_ipc"
    if transport == "cuda_ipc":
        raise KVTransferError("transport cuda_ipc reaches only a CUDA arena on this host; the "
                              "slab is on another host or in host memory")
    if transport in ("auto", "dist") and has_store:
        return "dist"
    raise KVTransferError(f"no device transport reaches this slab (transport {transport}, "
                          f"rendezvous store {'set' if has_store else 'not set'})")


def engine_arena_bytes(kv_transfer_config: dict[str, Any] | None, cache_is_cuda: bool) -> int:
    """The device staging arena the engine of this vLLM KVTransferConfig (as keyword
    arguments, `params.vllm_kv_transfer_config`) will allocate: a prefill's on the device
    path, else 0 (decodes stage nothing)."""
    if not kv_transfer_config or kv_transfer_config.get("kv_role") != "kv_producer":
        return 0
    settings = ConnectorSettings.from_extra_config(kv_transfer_config.get("kv_connector_extra_config"))
    if staging_medium(settings, cache_is_cuda) != "device":
        return 0
    return settings.device_arena_bytes
