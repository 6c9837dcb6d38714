"""Who may talk to the aggregator: per-client tokens, TLS settings, the server's auth interceptor.

Every call carries the client's id and its bearer token as gRPC metadata. The server keeps only
SHA-256 digests of the tokens and compares them in constant time; an unknown id is compared
against a dummy digest, so timing tells an attacker neither which ids exist nor how much of a
token was right. Tokens are never logged and never shown in a repr.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import logging
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from gradguard.transport.errors import TransportError

log = logging.getLogger(__name__)

CLIENT_ID_KEY = "x-gradguard-client-id"
AUTHORIZATION_KEY = "authorization"
_BEARER = "Bearer "
MIN_TOKEN_CHARS = 16
# Client ids name files in the state directory, so they are restricted to a safe alphabet.
_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def generate_tokens(client_ids: Iterable[str]) -> dict[str, str]:
    """A fresh random token (256 bits, URL-safe) for each client id."""
    return {client_id: secrets.token_urlsafe(32) for client_id in client_ids}


def call_metadata(client_id: str, token: str) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends with every call."""
    return ((CLIENT_ID_KEY, client_id), (AUTHORIZATION_KEY, _BEARER + token))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenRegistry:
    """The known clients and the digests of their tokens."""

    def __init__(self, clients: Mapping[str, str | Mapping[str, Any]]) -> None:
        if not isinstance(clients, Mapping) or not clients:
            raise ValueError("no clients: pass clients={client_id: token} (or {client_id: {\"token\": ..., "
                             "\"max_num_samples\": n}}), e.g. from generate_tokens(['c1', 'c2'])")
        tokens: dict[str, str] = {}
        self.max_num_samples: dict[str, int] = {}
        for client_id, entry in clients.items():
            if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
                raise ValueError(f"client id {short_id(client_id)} is not allowed: use 1-64 characters from "
                                 "letters, digits, '.', '_' and '-', starting with a letter or digit")
            token = entry.get("token") if isinstance(entry, Mapping) else entry
            if isinstance(entry, Mapping):
                unknown = sorted(set(entry) - {"token", "max_num_samples"})
                limit = entry.get("max_num_samples")
                if unknown or (limit is not None and (type(limit) is not int or limit < 1)):
                    raise ValueError(f"client {client_id!r}: an entry is {{\"token\": str, \"max_num_samples\": "
                                     f"int >= 1 (optional)}}; got fields {unknown[:5] or sorted(entry)}")
                if limit is not None:
                    self.max_num_samples[client_id] = limit
            if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
                raise ValueError(f"the token of client {client_id!r} is shorter than {MIN_TOKEN_CHARS} "
                                 "characters; use generate_tokens() or secrets.token_urlsafe(32)")
            tokens[client_id] = token
        self._digests = {client_id: _digest(token) for client_id, token in tokens.items()}
        self._dummy = _digest(secrets.token_urlsafe(32))

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._digests

    def verify(self, client_id: str, token: str) -> bool:
        expected = self._digests.get(client_id, self._dummy)
        return hmac.compare_digest(_digest(token), expected) and client_id in self._digests

    def authenticate(self, metadata: Iterable[tuple[str, Any]]) -> str | None:
        """The client id that ``metadata`` proves, or None."""
        values = dict(metadata)
        client_id, authorization = values.get(CLIENT_ID_KEY), values.get(AUTHORIZATION_KEY)
        if not isinstance(client_id, str) or not isinstance(authorization, str):
            return None
        if not authorization.startswith(_BEARER):
            return None
        return client_id if self.verify(client_id, authorization[len(_BEARER):]) else None


def short_id(value: object) -> str:
    """A claimed client id fit for a log line: at most its first 64 characters."""
    text = repr(value)
    return text if len(text) <= 66 else f"{text[:64]}... ({len(text)} characters)"


def authenticated_client(context: grpc.ServicerContext, *, bind_certificate: bool = False) -> str:
    """The caller's client id; only valid behind :class:`AuthInterceptor`, which checked it.

    With ``bind_certificate`` (mutual TLS) the id must also be one of the names of the client's
    certificate (its subject CN or a subject alternative name): a client's certificate then
    proves its id, and a stolen token is useless without the matching key.
    """
    client_id = dict(context.invocation_metadata())[CLIENT_ID_KEY]
    if bind_certificate:
        auth = context.auth_context()
        names = {v.decode(errors="replace") for key in ("x509_common_name", "x509_subject_alternative_name")
                 for v in auth.get(key, [])}
        if client_id not in names:
            raise TransportError(grpc.StatusCode.PERMISSION_DENIED,
                                 f"client {client_id!r} presented a certificate for {sorted(names)[:4]}; under mutual "
                                 "TLS a client's certificate must name its client id (subject CN or SAN)")
    return client_id


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call without valid credentials with UNAUTHENTICATED, before any handler runs."""

    def __init__(self, tokens: TokenRegistry) -> None:
        self._tokens = tokens

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        if handler is None or self._tokens.authenticate(metadata):
            return handler
        log.warning("refused %s: no valid credentials for client %s", handler_call_details.method,
                    short_id(dict(metadata).get(CLIENT_ID_KEY)))
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as ``handler`` that aborts with UNAUTHENTICATED."""
    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      f"unknown client or wrong token: send metadata {CLIENT_ID_KEY!r} and "
                      f"'{AUTHORIZATION_KEY}: Bearer <token>' with the token the server was given for the client")

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def check_private_file(path: Path, what: str) -> None:
    """Refuse a secret file that other users can read."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ValueError(f"{path} ({what}) can be read by other users (mode {mode:o}); make it private with "
                         f"chmod 600 {path}")


def _der(data: bytes, position: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``position``."""
    tag, length = data[position], data[position + 1]
    position += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[position:position + count], "big")
        position += count
    return tag, position, position + length


def certificate_not_after(pem: bytes) -> datetime.datetime:
    """The expiry time of the first certificate in ``pem`` (read from its DER, no dependency)."""
    body = pem.split(b"-----BEGIN CERTIFICATE-----", 1)[1].split(b"-----END CERTIFICATE-----", 1)[0]
    der = base64.b64decode(b"".join(body.split()))
    _, tbs, _ = _der(der, 0)
    tag, start, end = _der(der, tbs)
    position = start
    fields: list[tuple[int, int]] = []
    while position < end and len(fields) < 5:
        tag, content, stop = _der(der, position)
        if tag != 0xA0:  # the optional explicit version
            fields.append((content, stop))
        position = stop
    validity_start, _ = fields[3]  # serial, signature algorithm, issuer, validity
    _, _, not_before_end = _der(der, validity_start)
    tag, content, stop = _der(der, not_before_end)
    text = der[content:stop].decode()
    if tag == 0x17:  # UTCTime: two-digit years, 50-99 in the 1900s
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    return datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.timezone.utc)


def _read(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class ServerTLS:
    """The server's TLS identity; with ``client_ca`` set, clients must present a certificate
    signed by it (mutual TLS) on top of their token.

    Each field takes PEM bytes or a path to a PEM file.
    """

    certificate_chain: bytes | str | Path
    private_key: bytes | str | Path = field(repr=False)
    client_ca: bytes | str | Path | None = None

    def warn_if_expiring(self, *, within: datetime.timedelta = datetime.timedelta(days=7)) -> None:
        """Log a warning when the server's certificate has expired or expires within ``within``."""
        try:
            not_after = certificate_not_after(_read(self.certificate_chain) or b"")
        except (ValueError, IndexError, UnicodeDecodeError):
            log.warning("could not read the expiry date of the server's certificate")
            return
        left = not_after - datetime.datetime.now(datetime.timezone.utc)
        if left <= datetime.timedelta(0):
            log.warning("the server's certificate EXPIRED on %s: clients will refuse it; renew it", not_after)
        elif left <= within:
            log.warning("the server's certificate expires on %s (in %.1f days); renew it", not_after,
                        left.total_seconds() / 86400)

    def credentials(self) -> grpc.ServerCredentials:
        client_ca = _read(self.client_ca)
        return grpc.ssl_server_credentials(
            [(_read(self.private_key), _read(self.certificate_chain))],
            root_certificates=client_ca, require_client_auth=client_ca is not None)


@dataclass(frozen=True)
class ClientTLS:
    """How a client checks the server (and, for mutual TLS, proves itself).

    root_certificates: the CA that signed the server's certificate; None uses the system's roots.
    certificate_chain / private_key: the client's certificate, for a server that requires mutual TLS.
    server_name: the name to check the server's certificate against, when it differs from the
        host in the address (e.g. a certificate for "aggregator.local" served on 127.0.0.1).
    """

    root_certificates: bytes | str | Path | None = None
    certificate_chain: bytes | str | Path | None = None
    private_key: bytes | str | Path | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mutual TLS needs both certificate_chain and private_key (or neither)")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates), private_key=_read(self.private_key),
            certificate_chain=_read(self.certificate_chain))

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
