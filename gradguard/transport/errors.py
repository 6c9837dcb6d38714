"""The one error type of the transport: a gRPC status code and a message that says what to fix."""
from __future__ import annotations

import grpc

OPEN_ROUND_KEY = "x-gradguard-open-round"  # trailing metadata of a refusal for the wrong round


class TransportError(Exception):
    """A call the aggregator refused or could not complete.

    The server raises it to reject a call (the servicer turns it into the gRPC status); the
    client raises it for every failed call, so callers catch one type and read ``code``.
    ``open_round`` is the round the server has open, when it refused an update or a fetch for
    another one: train for that round (``guard.begin_round(err.open_round)``) and submit again.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, open_round: int | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.open_round = open_round
