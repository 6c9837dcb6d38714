"""TLS with certificates made in the test: the right client gets through, every other is refused."""
from __future__ import annotations

import grpc
import pytest
from transport_helpers import (assert_states_close, client_certificate, make_pki, make_update, reference_fedavg,
                               small_state, state_dir_snapshot)

from gradguard.transport import AggregatorServer, ClientTLS, ServerTLS, TransportError

STATE = small_state()


@pytest.fixture(scope="module")
def pki():
    return make_pki()


def _refused(client, code: grpc.StatusCode, hint: str = "") -> None:
    with pytest.raises(TransportError) as err:
        client.submit(make_update(STATE, seed=7, num_samples=1))
    assert err.value.code == code, err.value
    assert hint in err.value.message


def test_tls_client_is_served_and_plaintext_and_untrusting_clients_are_refused(pki, start_server, connect,
                                                                               tokens, tmp_path):
    for name, pem in (("server.pem", pki.server_cert), ("server.key", pki.server_key), ("ca.pem", pki.ca)):
        (tmp_path / name).write_bytes(pem)
    server = start_server(STATE, clients=tokens, tls=ServerTLS(tmp_path / "server.pem", tmp_path / "server.key"),
                          round_deadline_s=None)
    before = state_dir_snapshot(tmp_path / "state")

    _refused(connect(server, "c1"), grpc.StatusCode.UNAVAILABLE,  # plaintext: the handshake fails
             "If it speaks TLS, connect with tls=ClientTLS(root_certificates=...)")
    _refused(connect(server, "c1", tls=ClientTLS(root_certificates=pki.other_ca)), grpc.StatusCode.UNAVAILABLE,
             "Check that root_certificates (--tls-ca) is the CA that signed the server's certificate")
    _refused(connect(server, "c1", tls=ClientTLS(root_certificates=pki.ca), token="a-wrong-token-0123456789"),
             grpc.StatusCode.UNAUTHENTICATED)
    assert state_dir_snapshot(tmp_path / "state") == before

    client = connect(server, "c1", tls=ClientTLS(root_certificates=tmp_path / "ca.pem"))
    client.join()
    update = make_update(STATE, seed=1, num_samples=3)
    assert not client.submit(update).duplicate
    client.wait_for_round(1, timeout_s=10, poll_s=0.05)
    _, fetched = client.fetch_global()
    assert_states_close(fetched, reference_fedavg(STATE, [update]), atol=1e-7)


def test_mutual_tls_requires_a_client_certificate_and_a_token(pki, start_server, connect, tokens, tmp_path):
    server = start_server(STATE, clients=tokens, tls=ServerTLS(pki.server_cert, pki.server_key, client_ca=pki.ca),
                          round_deadline_s=None)
    before = state_dir_snapshot(tmp_path / "state")
    _refused(connect(server, "c1", tls=ClientTLS(root_certificates=pki.ca)), grpc.StatusCode.UNAVAILABLE,
             "if the server requires mutual TLS (--tls-client-ca), give this client's certificate and key")
    with_cert = ClientTLS(root_certificates=pki.ca, certificate_chain=pki.client_cert, private_key=pki.client_key)
    _refused(connect(server, "c1", tls=with_cert, token="a-wrong-token-0123456789"), grpc.StatusCode.UNAUTHENTICATED)
    assert state_dir_snapshot(tmp_path / "state") == before

    client = connect(server, "c1", tls=with_cert)
    assert client.submit(make_update(STATE, seed=1, num_samples=3)).accepted_in_round == 1


def test_mutual_tls_binds_the_client_id_to_the_certificate(pki, start_server, connect, tokens, tmp_path):
    """c1's certificate with c2's id and token was accepted as c2."""
    server = start_server(STATE, clients=tokens, tls=ServerTLS(pki.server_cert, pki.server_key, client_ca=pki.ca),
                          round_deadline_s=None)
    before = state_dir_snapshot(tmp_path / "state")
    c1_cert = ClientTLS(root_certificates=pki.ca, certificate_chain=pki.client_cert, private_key=pki.client_key)
    for call in ("status", "join", "fetch_global"):
        with pytest.raises(TransportError) as err:
            getattr(connect(server, "c2", tls=c1_cert), call)()
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "must name its client id" in err.value.message
    _refused(connect(server, "c2", tls=c1_cert), grpc.StatusCode.PERMISSION_DENIED)
    assert state_dir_snapshot(tmp_path / "state") == before
    cert, key = client_certificate(pki, "c2")
    own = ClientTLS(root_certificates=pki.ca, certificate_chain=cert, private_key=key)
    assert not connect(server, "c2", tls=own).submit(make_update(STATE, seed=1, num_samples=3)).duplicate


def test_a_server_name_override_checks_the_certificate_against_that_name(pki, start_server, connect, tokens):
    server = start_server(STATE, clients=tokens, tls=ServerTLS(pki.server_cert, pki.server_key))
    assert connect(server, "c1", tls=ClientTLS(root_certificates=pki.ca, server_name="localhost")).status().round == 0
    with pytest.raises(TransportError) as err:
        connect(server, "c1", tls=ClientTLS(root_certificates=pki.ca, server_name="elsewhere.example")).status()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_plaintext_beyond_loopback_needs_an_explicit_opt_in(tokens, tmp_path):
    with pytest.raises(ValueError, match="refusing to serve plaintext on 0.0.0.0:0"):
        AggregatorServer(STATE, state_dir=tmp_path / "a", clients=tokens, address="0.0.0.0:0")
    AggregatorServer(STATE, state_dir=tmp_path / "b", clients=tokens, address="0.0.0.0:0", allow_insecure=True)


def test_tokens_stay_out_of_reprs_and_weak_tokens_are_refused(pki, tokens, tmp_path):
    assert "PRIVATE" not in repr(ServerTLS(pki.server_cert, pki.server_key))
    assert "PRIVATE" not in repr(ClientTLS(pki.ca, pki.client_cert, pki.client_key))
    with pytest.raises(ValueError, match="shorter than 16"):
        AggregatorServer(STATE, state_dir=tmp_path, clients={"c1": "short"})
    with pytest.raises(ValueError, match="client id '../x' is not allowed"):
        AggregatorServer(STATE, state_dir=tmp_path, clients={"../x": "t" * 32})
