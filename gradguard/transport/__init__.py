"""Protected updates over gRPC: an aggregator server (rounds of FedAvg or a robust rule) and its client.

Protocol: protos/gradguard/v1/aggregator.proto (package ``gradguard.v1``). Tensors travel as
safetensors in chunks with a BLAKE3 digest per payload; TLS (optionally mutual) plus a token per client.
Names are imported on first use, so that the server side (``gradguard serve``) never loads torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "Ack": "rounds", "AggregatorClient": "client", "AggregatorConfig": "config", "AggregatorServer": "server",
    "ClientTLS": "auth", "JoinInfo": "client", "RetryPolicy": "client", "RoundStatus": "rounds",
    "ServerTLS": "auth", "TransportError": "errors", "generate_tokens": "auth",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
