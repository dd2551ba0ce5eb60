"""The typed boundary between kvtransfer and vLLM: structs that convert to and from vLLM's dicts.

vLLM carries a connector's per-request state as ``kv_transfer_params`` (a dict on the
request and on its final output) and the connector's configuration as
``kv_connector_extra_config`` (a dict in `KVTransferConfig`). Those dicts, and the string
keys in them, exist only here; everything else in pdserve holds the structs:

    StagedKV           a staged prompt's KV: segment path, prompt tokens
                       (producer's request_finished -> ProducerService -> handle ->
                        ConsumerService.materialize -> consumer's scheduler half)
    KVLoadReport       how a decode request's prompt KV was obtained, reported by the
                       consumer's connector on the request's final output
    ConnectorSettings  the connector's settings, from `KVTransferSettings` (the one place
                       their defaults live)

Torch-free and vLLM-free: the workers and the services import this module, never the
connector.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import base64

import msgspec

from cluster.config import KVTransferSettings
from cluster.wire import KVTransferError, ServedBy

TransportName = Literal["shm", "tcp", "dist", "cuda_ipc"]

# Keys of vLLM's kv_transfer_params dict that pdserve reads and writes.
PARAM_SEGMENT = "pdserve_segment_path"
PARAM_NUM_TOKENS = "pdserve_num_tokens"
PARAM_LOAD_REPORT = "pdserve_kv_load"
PARAM_SLAB = "pdserve_slab"  # the device path: a `device_connector.SlabTicket`, msgpack, base64
PARAM_SLAB_TRANSPORT = "pdserve_slab_transport"  # which device transport the decode loads over
# Set by the prefill worker on a request whose KV several decodes will claim (n > 1): a slab
# serves one decode, so such a request is staged on the host path, in a segment.
PARAM_HOST_STAGING = "pdserve_host_staging"


def wants_host_staging(sampling_params: Any) -> bool:
    """Whether a request's sampling params (vLLM carries kv_transfer_params in their
    extra_args) ask for the host path."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    params = extra.get("kv_transfer_params") or {}
    return bool(params.get(PARAM_HOST_STAGING))

CONNECTOR_NAME = "PdserveConnector"
CONNECTOR_MODULE = "kvtransfer.connector"


class StagedKV(msgspec.Struct, frozen=True):
    """A request's prompt KV staged in a segment that the reading side can open, or (the
    device path) in a slab of the prefill's device arena that `slab` describes."""

    segment_path: str
    num_tokens: int  # prompt tokens whose KV the segment holds
    slab: bytes | None = None  # a msgpack `device_connector.SlabTicket`; None: host segment
    slab_transport: Literal["cuda_ipc", "dist"] | None = None  # set by the decode's service

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {PARAM_SEGMENT: self.segment_path, PARAM_NUM_TOKENS: self.num_tokens}
        if self.slab is not None:  # vLLM's params travel as msgpack/JSON: text, not bytes
            params[PARAM_SLAB] = base64.b64encode(self.slab).decode("ascii")
            params[PARAM_SLAB_TRANSPORT] = self.slab_transport
        return params

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> StagedKV | None:
        """The staged KV a kv_transfer_params dict names; None when it names none."""
        if not params or PARAM_SEGMENT not in params:
            return None
        try:
            slab = params.get(PARAM_SLAB)
            return msgspec.convert({"segment_path": params[PARAM_SEGMENT],
                                    "num_tokens": params.get(PARAM_NUM_TOKENS, 0),
                                    "slab": base64.b64decode(slab) if slab is not None else None,
                                    "slab_transport": params.get(PARAM_SLAB_TRANSPORT)},
                                   cls, strict=False)
        except (msgspec.ValidationError, ValueError) as e:
            raise KVTransferError(f"malformed staged-KV parameters: {e}") from e


class KVLoadReport(msgspec.Struct, frozen=True):
    """How the consumer's connector obtained one request's prompt KV.

    `served_by` is "transferred" when the staged blocks were loaded (every planned block,
    without a load error), "recomputed" when the engine computed the prompt itself (the
    segment was unusable, or its load failed and the policy is recompute).
    """

    served_by: Literal["transferred", "recomputed"]
    num_local_tokens: int  # prompt tokens the decode had in its own prefix cache
    num_loaded_tokens: int  # prompt tokens whose KV was copied from the segment
    reason: str | None = None  # why it was recomputed

    @property
    def source(self) -> ServedBy:
        return self.served_by

    def to_params(self) -> dict[str, Any]:
        return {PARAM_LOAD_REPORT: msgspec.to_builtins(self)}

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> KVLoadReport | None:
        if not params or PARAM_LOAD_REPORT not in params:
            return None
        try:
            return msgspec.convert(params[PARAM_LOAD_REPORT], cls)
        except msgspec.ValidationError as e:
            raise KVTransferError(f"malformed KV load report: {e}") from e


def _default(name: str) -> Any:
    return KVTransferSettings.model_fields[name].default


def _gib(value: float) -> int:
    return int(value * (1 << 30))


class ConnectorSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What `PdserveConnector` reads from ``kv_connector_extra_config``. Defaults are
    `KVTransferSettings`'s (the connector never repeats them)."""

    staging_dir: str | None = None  # None: kvtransfer.segment.default_staging_dir()
    lease_s: float = _default("lease_s")
    pool_bytes: int = _gib(_default("staging_pool_gib"))  # recycled files per producer; 0: off
    layerwise: bool = _default("layerwise")  # stage each layer in save_kv_layer
    checksums: Literal["crc32", "xxh3_64"] | None = _default("checksums")
    device_arena_bytes: int = _gib(_default("device_staging_gib"))  # device path only
    device_path: Literal["auto", "off", "force"] = _default("device_path")
    # What the device path needs to know of the transport (device_path.py decides with it;
    # the prefill's slab responder and the decode's slab loads connect with it).
    transport: Literal["auto", "shm", "tcp", "dist", "cuda_ipc"] = _default("transport")
    dist_store_host: str | None = None
    dist_store_port: int | None = None
    dist_backend: Literal["gloo", "nccl"] = _default("dist_backend")
    connect_timeout_s: float = _default("connect_timeout_s")

    @classmethod
    def from_settings(cls, settings: KVTransferSettings, staging_dir: Path | str) -> ConnectorSettings:
        return cls(staging_dir=str(staging_dir), lease_s=settings.lease_s,
                   pool_bytes=_gib(settings.staging_pool_gib), layerwise=settings.layerwise,
                   checksums=settings.checksums,
                   device_arena_bytes=_gib(settings.device_staging_gib),
                   device_path=settings.device_path, transport=settings.transport,
                   dist_store_host=settings.dist_store_host,
                   dist_store_port=settings.dist_store_port,
                   dist_backend=settings.dist_backend,
                   connect_timeout_s=settings.connect_timeout_s)

    def to_extra_config(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> ConnectorSettings:
        try:
            return msgspec.convert(dict(extra or {}), cls, strict=False)
        except msgspec.ValidationError as e:
            raise ValueError(f"invalid kv_connector_extra_config for {CONNECTOR_NAME}: {e}") from e


def vllm_kv_transfer_config(role: Literal["kv_producer", "kv_consumer"],
                            settings: KVTransferSettings, engine_id: str,
                            staging_dir: Path) -> dict[str, Any]:
    """Keyword arguments for vLLM's KVTransferConfig that load pdserve's connector."""
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": role,
        "engine_id": engine_id,
        "kv_load_failure_policy": settings.on_failure,
        "kv_connector_extra_config": ConnectorSettings.from_settings(
            settings, staging_dir).to_extra_config(),
    }
