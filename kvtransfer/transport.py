"""KV transports, as one import: re-exports `registry.py`, `host_transports.py` and
`dist_channel.py` (each holds one of the concepts this module used to hold). New code
imports the concept's own module."""

from kvtransfer.dist_channel import (
    DistFetchRequest,
    DistFetchTransport,
    DistResponder,
    DistStop,
    _queue_key,
    connect_store,
    dist_peer_id,
    host_store,
)
from kvtransfer.host_transports import ShmTransport, TcpTransport
from kvtransfer.registry import (
    TRANSPORTS,
    Transport,
    TransportFactory,
    TransportRegistry,
    get_transport,
    register_transport,
)

__all__ = ["TRANSPORTS", "DistFetchRequest", "DistFetchTransport", "DistResponder", "DistStop",
           "ShmTransport", "TcpTransport", "Transport", "TransportFactory", "TransportRegistry",
           "connect_store", "dist_peer_id", "get_transport", "host_store", "register_transport"]
