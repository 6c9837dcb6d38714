"""Protected updates over gRPC: an aggregator server (FedAvg in rounds) and its client.

Protocol: protos/gradguard/v1/aggregator.proto (package ``gradguard.v1``). Tensors travel as
safetensors in chunks with a SHA-256 per payload; TLS (optionally mutual) plus a token per client.
"""
from gradguard.transport.auth import ClientTLS, ServerTLS, generate_tokens
from gradguard.transport.client import AggregatorClient, JoinInfo, RetryPolicy
from gradguard.transport.config import AggregatorConfig
from gradguard.transport.errors import TransportError
from gradguard.transport.rounds import Ack, RoundStatus
from gradguard.transport.server import AggregatorServer

__all__ = [
    "Ack", "AggregatorClient", "AggregatorConfig", "AggregatorServer", "ClientTLS", "JoinInfo",
    "RetryPolicy", "RoundStatus", "ServerTLS", "TransportError", "generate_tokens",
]
