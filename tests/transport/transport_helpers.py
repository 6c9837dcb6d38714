"""Helpers of the transport tests: models, updates, the in-memory FedAvg reference, raw calls, PKI."""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from torch import nn

from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.transport._generated.v1 import aggregator_pb2_grpc as pb_grpc
from gradguard.transport.auth import call_metadata
from gradguard.transport.codec import CHUNK_BYTES
from gradguard.update import ProtectedUpdate


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A conv + BatchNorm + linear model's state: float parameters and buffers, one int buffer."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def make_update(state: dict[str, torch.Tensor], *, seed: int, num_samples: int, round: int = 0,
                client_id: str = "") -> ProtectedUpdate:
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(t.shape, generator=generator, dtype=t.dtype) * 0.01
               for name, t in state.items() if t.is_floating_point()}
    return ProtectedUpdate(tensors=tensors, kind="delta", num_samples=num_samples, num_steps=3, round=round,
                           client_id=client_id)


def reference_fedavg(state: dict[str, torch.Tensor], updates: list[ProtectedUpdate]) -> dict[str, torch.Tensor]:
    """FedAvg computed in memory, in float64: global + sum_i n_i d_i / sum_i n_i."""
    total = sum(u.num_samples for u in updates)
    result = {}
    for name, value in state.items():
        if not value.is_floating_point():
            result[name] = value.clone()
            continue
        mean = sum(u.tensors[name].double() * u.num_samples for u in updates) / total
        result[name] = (value.double() + mean).to(value.dtype)
    return result


def assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0, msg=name)


def raw_submit(address: str, client_id: str, token: str, header: pb.UpdateHeader,
               payload: bytes) -> pb.SubmitUpdateResponse:
    """One SubmitUpdate call with a hand-made header and payload (no client-side checks)."""
    chunks = [payload[i:i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)]
    messages = [pb.SubmitUpdateRequest(header=header)] + [pb.SubmitUpdateRequest(data=c) for c in chunks]
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.AggregatorStub(channel).SubmitUpdate(iter(messages), metadata=call_metadata(client_id, token),
                                                            timeout=30)


def write_private(path: Path, text: str) -> Path:
    """Write a secret file the way the CLI requires it: readable by its owner only."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def state_dir_snapshot(state_dir: Path) -> dict[str, bytes]:
    """Every file of a state directory and its bytes (to show a refused call changed nothing)."""
    return {str(p.relative_to(state_dir)): p.read_bytes() for p in sorted(state_dir.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class Pki:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    other_ca: bytes  # a CA that signed nothing here
    ca_key: object = None


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, san: list | None = None,
                 days: float = 1.0) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=abs(days) + 1))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def server_certificate(*, days: float) -> tuple[bytes, bytes]:
    """A self-signed certificate for localhost valid for ``days`` from now (negative: expired), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    return _certificate("localhost", key, "localhost", key, ca=False, days=days), _key_pem(key)


def client_certificate(pki: "Pki", common_name: str) -> tuple[bytes, bytes]:
    """A client certificate for ``common_name`` signed by the PKI's CA, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    return _certificate(common_name, key, "gradguard test CA", pki.ca_key, ca=False), _key_pem(key)


def make_pki() -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and an unrelated CA."""
    ca_key, other_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return Pki(
        ca=_certificate("gradguard test CA", ca_key, "gradguard test CA", ca_key, ca=True),
        server_cert=_certificate("localhost", server_key, "gradguard test CA", ca_key, ca=False, san=san),
        server_key=_key_pem(server_key),
        client_cert=_certificate("c1", client_key, "gradguard test CA", ca_key, ca=False),
        client_key=_key_pem(client_key),
        other_ca=_certificate("other CA", other_key, "other CA", other_key, ca=True),
        ca_key=ca_key,
    )
