"""The host-memory transports: shm (same host, in place) and tcp (any host, pulled)."""

from __future__ import annotations

import threading
from pathlib import Path

from cluster.config import KVTransferSettings
from cluster.wire import KVTransferError
from kvtransfer import auth as kv_auth
from kvtransfer.handle import TransferDescriptor
from kvtransfer.pool import SegmentPool
from kvtransfer.segment import StagingSegment
from kvtransfer.tcp import fetch_segment


class ShmTransport:
    """Same host: the producer's segment is already readable here; the connector opens it
    in place. Nothing moves, so nothing can be half done."""

    name = "shm"
    is_local = True

    def __init__(self, settings: KVTransferSettings, consumer_id: str):
        pass

    def fetch(self, desc: TransferDescriptor, dest_dir: Path, timeout_s: float) -> tuple[Path, int]:
        path = Path(desc.segment_path)
        try:
            seg = StagingSegment.open(path)
        except KVTransferError as e:
            raise KVTransferError(f"staged KV {path.name} is gone (expired or released): {e}") from e
        try:
            return path, seg.nbytes
        finally:
            seg.close()

    def close(self) -> None:
        pass


class TcpTransport:
    """Any host: pull the segment from the producer node's TransferServer (see tcp.py)."""

    name = "tcp"
    is_local = False

    def __init__(self, settings: KVTransferSettings, consumer_id: str):
        self._pool_bytes = int(settings.staging_pool_gib * (1 << 30))
        self._pool_id = f"fetch-{consumer_id}"
        self._secret = kv_auth.kv_secret(settings)
        self._pools: dict[Path, SegmentPool] = {}  # per destination dir
        self._lock = threading.Lock()

    def _pool(self, dest_dir: Path) -> SegmentPool | None:
        """This consumer's pool of received files (pre-faulted, mapped), made on first use."""
        if self._pool_bytes <= 0:
            return None
        with self._lock:
            pool = self._pools.get(dest_dir)
            if pool is None:
                pool = self._pools[dest_dir] = SegmentPool(dest_dir, self._pool_id,
                                                           self._pool_bytes)
            return pool

    def fetch(self, desc: TransferDescriptor, dest_dir: Path, timeout_s: float) -> tuple[Path, int]:
        return fetch_segment(desc.tcp_host, desc.tcp_port, Path(desc.segment_path).name,
                             desc.producer_epoch, dest_dir, timeout_s,
                             pool=self._pool(Path(dest_dir)), pool_lock=self._lock,
                             secret=self._secret)

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()
