"""The one error type of the transport: a gRPC status code and a message that says what to fix."""
from __future__ import annotations

import grpc


class TransportError(Exception):
    """A call the aggregator refused or could not complete.

    The server raises it to reject a call (the servicer turns it into the gRPC status); the
    client raises it for every failed call, so callers catch one type and read ``code``.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
