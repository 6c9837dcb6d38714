from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gradguard.transport import (AggregatorClient, AggregatorConfig, AggregatorServer, RetryPolicy,
                                 generate_tokens)


@pytest.fixture
def tokens() -> dict[str, str]:
    return generate_tokens(["c1", "c2", "c3"])


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., AggregatorServer]]:
    """Starts in-process servers on loopback (state under tmp_path/state) and stops them after the test."""
    servers: list[AggregatorServer] = []

    def start(state, *, clients: dict[str, str], tls=None, **config) -> AggregatorServer:
        server = AggregatorServer(state, state_dir=tmp_path / "state", clients=clients,
                                  config=AggregatorConfig(**config), tls=tls).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture
def connect(tokens: dict[str, str]) -> Iterator[Callable[..., AggregatorClient]]:
    """Clients with the fixture's tokens and no retries (a refused call fails at once)."""
    clients: list[AggregatorClient] = []

    def make(server: AggregatorServer, client_id: str, **kwargs) -> AggregatorClient:
        kwargs.setdefault("token", tokens.get(client_id, "not-a-valid-token-0123456789"))
        kwargs.setdefault("retry", RetryPolicy(attempts=1))
        client = AggregatorClient(server.address, client_id=client_id, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
