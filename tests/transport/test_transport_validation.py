"""Every bad submission gets its precise gRPC status and leaves the aggregate and the state untouched.

Each case: a bad call, the status code and message it must get, the state directory byte for
byte unchanged; then the same client's good update closes the round, and the new global model is
exactly FedAvg of that good update alone, so nothing of the bad one reached the sum.
"""
from __future__ import annotations

import blake3
import json
from dataclasses import replace

import grpc
import pytest
import torch
from transport_helpers import (assert_states_close, make_update, raw_submit, reference_fedavg, small_state,
                               state_dir_snapshot)

from gradguard.transport import TransportError
from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.transport._generated.v1 import aggregator_pb2_grpc as pb_grpc
from gradguard.transport.auth import call_metadata
from gradguard.transport.codec import TensorPayload, encode_tensors, update_header

STATE = small_state()
SIZE = len(encode_tensors(make_update(STATE, seed=0, num_samples=1).tensors))
LIMIT = SIZE + 256  # the server's max_update_bytes: a good update fits


def _send(server, tokens, tensors=None, *, payload=None, client_id="c1", token=None, **header_fields):
    """Submit ``tensors`` (or raw ``payload``) as c1 with the header fields overridden."""
    update = make_update(STATE, seed=1, num_samples=2)
    if tensors is not None:
        update.tensors = tensors
    header = update_header(update, TensorPayload(update.tensors), client_id="c1")
    if payload is None:
        payload = encode_tensors(update.tensors)
    # The digest in the header, as clients before the UpdateTrailer send it (raw bytes get an
    # otherwise honest header).
    header.total_bytes, header.digest = len(payload), blake3.blake3(payload).hexdigest()
    for name, value in header_fields.items():
        if name == "metadata":
            header.metadata.update(value)
        else:
            setattr(header, name, value)
    return raw_submit(server.address, client_id, token or tokens[client_id], header, payload)


def _send_with_trailer(server, tokens, *tail, header_digest=""):
    """Submit the good update as clients do (its digest in a trailer), then ``tail`` messages
    (the trailers, or whatever follows the data) in place of the honest trailer."""
    update = make_update(STATE, seed=1, num_samples=2)
    payload = TensorPayload(update.tensors)
    header = update_header(update, payload, client_id="c1")
    header.digest = header_digest
    messages = [pb.SubmitUpdateRequest(header=header)] + [pb.SubmitUpdateRequest(data=c) for c in payload.chunks()]
    return _stub_submit(server, messages + list(tail), metadata=call_metadata("c1", tokens["c1"]))


def _trailer(digest):
    return pb.SubmitUpdateRequest(trailer=pb.UpdateTrailer(digest=digest))


_GOOD_DIGEST = blake3.blake3(encode_tensors(make_update(STATE, seed=1, num_samples=2).tensors)).hexdigest()


def _stub_submit(server, messages, *, metadata):
    with grpc.insecure_channel(server.address) as channel:
        return pb_grpc.AggregatorStub(channel).SubmitUpdate(iter(messages), metadata=metadata, timeout=10)


def _changed(name, change):
    tensors = dict(make_update(STATE, seed=1, num_samples=2).tensors)
    tensors[name] = change(tensors[name])
    return tensors


def _without(name):
    tensors = dict(make_update(STATE, seed=1, num_samples=2).tensors)
    del tensors[name]
    return tensors


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[-1] = float("-inf")
    return t


_GOOD = make_update(STATE, seed=1, num_samples=2).tensors
_GOOD_PAYLOAD = encode_tensors(_GOOD)


def _overlapping() -> bytes:
    """The good payload with its first tensor's range moved onto the second's (same length)."""
    length = int.from_bytes(_GOOD_PAYLOAD[:8], "little")
    header = json.loads(_GOOD_PAYLOAD[8:8 + length])
    first, second = sorted((v["data_offsets"] for k, v in header.items() if k != "__metadata__"))[:2]
    moved = f"[{second[0]},{second[0] + first[1] - first[0]}]"
    text = _GOOD_PAYLOAD[8:8 + length].decode().replace(f"[{first[0]},{first[1]}]", moved, 1)
    return _GOOD_PAYLOAD[:8] + text.encode() + _GOOD_PAYLOAD[8 + length:]
INT_BUFFER = "1.num_batches_tracked"

CASES = {
    "malformed_bytes": (lambda s, t: _send(s, t, payload=b"\x00not safetensors" * 64),
                        grpc.StatusCode.INVALID_ARGUMENT, "not valid safetensors"),
    "truncated_safetensors": (lambda s, t: _send(s, t, payload=_GOOD_PAYLOAD[:-8]),
                              grpc.StatusCode.INVALID_ARGUMENT, "not valid safetensors"),
    "wrong_shape": (lambda s, t: _send(s, t, _changed("3.weight", lambda w: w[:, :-1].contiguous())),
                    grpc.StatusCode.INVALID_ARGUMENT, "'3.weight' has shape [3, 143]"),
    "wrong_dtype": (lambda s, t: _send(s, t, _changed("0.bias", lambda w: w.double())),
                    grpc.StatusCode.INVALID_ARGUMENT, "'0.bias' has dtype F64, the global model's is F32"),
    "missing_tensor": (lambda s, t: _send(s, t, _without("1.running_var")),
                       grpc.StatusCode.INVALID_ARGUMENT, "missing ['1.running_var']"),
    "integer_buffer_sent": (lambda s, t: _send(s, t, {**_GOOD, INT_BUFFER: torch.tensor(1)}),
                            grpc.StatusCode.INVALID_ARGUMENT, f"unexpected ['{INT_BUFFER}']"),
    "nan": (lambda s, t: _send(s, t, _changed("3.weight", _nan)),
            grpc.StatusCode.INVALID_ARGUMENT, "'3.weight' has a non-finite value (nan) at flat index 0"),
    "inf": (lambda s, t: _send(s, t, _changed("0.weight", _inf)),
            grpc.StatusCode.INVALID_ARGUMENT, "'0.weight' has a non-finite value (-inf) at flat index 35"),
    "oversize": (lambda s, t: _send(s, t, {**_GOOD, "padding": torch.zeros(1000)}),
                 grpc.StatusCode.RESOURCE_EXHAUSTED, f"over this server's limit of {LIMIT} bytes"),
    "longer_than_declared": (lambda s, t: _send(s, t, total_bytes=SIZE - 100),
                             grpc.StatusCode.INVALID_ARGUMENT, "longer than the header's total_bytes"),
    "checksum_mismatch": (lambda s, t: _send(s, t, digest="0" * 64),
                          grpc.StatusCode.DATA_LOSS, "the payload's BLAKE3 digest is"),
    "future_round": (lambda s, t: _send(s, t, round=1),
                     grpc.StatusCode.FAILED_PRECONDITION, "round 1 has not opened; the open round is 0"),
    "past_round": (lambda s, t: _send(s, t, round=-1),
                   grpc.StatusCode.FAILED_PRECONDITION, "round -1 is closed; the open round is 0"),
    "unknown_client": (lambda s, t: _send(s, t, client_id="mallory", token="m" * 32),
                       grpc.StatusCode.UNAUTHENTICATED, "unknown client or wrong token"),
    "wrong_token": (lambda s, t: _send(s, t, token=t["c2"]),
                    grpc.StatusCode.UNAUTHENTICATED, "unknown client or wrong token"),
    "no_credentials": (lambda s, t: _stub_submit(s, [pb.SubmitUpdateRequest(data=b"x")], metadata=()),
                       grpc.StatusCode.UNAUTHENTICATED, "unknown client or wrong token"),
    "impersonation": (lambda s, t: _send(s, t, client_id="c2"),
                      grpc.StatusCode.PERMISSION_DENIED, "names client 'c1' but the credentials are 'c2'"),
    "gradient_kind": (lambda s, t: _send(s, t, kind="gradient"),
                      grpc.StatusCode.INVALID_ARGUMENT, "averages weight deltas"),
    "zero_samples": (lambda s, t: _send(s, t, num_samples=0),
                     grpc.StatusCode.INVALID_ARGUMENT, "num_samples is 0"),
    "weight_2_to_the_63": (lambda s, t: _send(s, t, num_samples=2**63 - 1),
                           grpc.StatusCode.INVALID_ARGUMENT, "over the 1000000 this server allows"),
    "bulky_header_metadata": (lambda s, t: _send(s, t, metadata={"junk": "x" * (100 << 10)}),
                              grpc.StatusCode.INVALID_ARGUMENT, "the header's metadata is"),
    "overlapping_offsets": (lambda s, t: _send(s, t, payload=_overlapping()),
                            grpc.StatusCode.INVALID_ARGUMENT, "without gaps or overlaps"),
    "trailer_checksum_mismatch": (lambda s, t: _send_with_trailer(s, t, _trailer("0" * 64)),
                                  grpc.StatusCode.DATA_LOSS, "the payload's BLAKE3 digest is"),
    "no_checksum_anywhere": (lambda s, t: _send_with_trailer(s, t),
                             grpc.StatusCode.INVALID_ARGUMENT, "the update carries no digest"),
    "malformed_trailer": (lambda s, t: _send_with_trailer(s, t, _trailer("not hex")),
                          grpc.StatusCode.INVALID_ARGUMENT, "the trailer's digest is not 64 lowercase hex digits"),
    "data_after_trailer": (lambda s, t: _send_with_trailer(s, t, _trailer(_GOOD_DIGEST),
                                                          pb.SubmitUpdateRequest(data=b"x")),
                           grpc.StatusCode.INVALID_ARGUMENT, "came after the UpdateTrailer"),
    "two_trailers": (lambda s, t: _send_with_trailer(s, t, _trailer(_GOOD_DIGEST), _trailer(_GOOD_DIGEST)),
                     grpc.StatusCode.INVALID_ARGUMENT, "came after the UpdateTrailer"),
    "trailer_and_header_checksum": (lambda s, t: _send_with_trailer(s, t, _trailer(_GOOD_DIGEST),
                                                                   header_digest=_GOOD_DIGEST),
                                    grpc.StatusCode.INVALID_ARGUMENT, "and none when it is given"),
    "second_header": (lambda s, t: _send_with_trailer(s, t, pb.SubmitUpdateRequest(header=pb.UpdateHeader())),
                      grpc.StatusCode.INVALID_ARGUMENT, "after the UpdateHeader a SubmitUpdate stream carries data"),
    "data_before_header": (lambda s, t: _stub_submit(s, [pb.SubmitUpdateRequest(data=b"x")],
                                                     metadata=call_metadata("c1", t["c1"])),
                           grpc.StatusCode.INVALID_ARGUMENT, "first SubmitUpdate message must be the UpdateHeader"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_submission_is_refused_precisely_and_changes_nothing(case, start_server, connect, tokens, tmp_path):
    call, code, message = CASES[case]
    server = start_server(STATE, clients=tokens, max_update_bytes=LIMIT, round_deadline_s=None)
    client = connect(server, "c1")
    client.join()
    before, status_before = state_dir_snapshot(tmp_path / "state"), server.status()

    with pytest.raises(grpc.RpcError) as refused:
        call(server, tokens)
    assert refused.value.code() == code
    assert message in refused.value.details()

    assert state_dir_snapshot(tmp_path / "state") == before
    assert server.status() == status_before
    assert_states_close(server.global_state(), STATE, atol=0)
    good = make_update(STATE, seed=5, num_samples=3)
    assert client.submit(good).accepted_in_round == 1
    server.wait_for_round(1, timeout_s=10)
    assert_states_close(server.global_state(), reference_fedavg(STATE, [good]), atol=1e-7)


def test_identical_resubmission_is_idempotent(start_server, connect, tokens, tmp_path):
    server = start_server(STATE, clients=tokens, min_clients=2, round_deadline_s=None)
    client = connect(server, "c1")
    update = make_update(STATE, seed=1, num_samples=4)
    first = client.submit(update)
    before = state_dir_snapshot(tmp_path / "state")
    again = client.submit(update)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.digest == first.digest and again.accepted_in_round == 1
    assert state_dir_snapshot(tmp_path / "state") == before
    other = make_update(STATE, seed=2, num_samples=1)
    connect(server, "c2").submit(other)
    server.wait_for_round(1, timeout_s=10)
    assert_states_close(server.global_state(), reference_fedavg(STATE, [update, other]), atol=1e-7)


def test_a_different_second_update_in_a_round_is_refused(start_server, connect, tokens, tmp_path):
    server = start_server(STATE, clients=tokens, min_clients=2, round_deadline_s=None)
    client = connect(server, "c1")
    update = make_update(STATE, seed=1, num_samples=4)
    client.submit(update)
    before = state_dir_snapshot(tmp_path / "state")
    with pytest.raises(TransportError) as refused:
        client.submit(make_update(STATE, seed=2, num_samples=4))
    assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "already has a different update accepted in round 0" in refused.value.message
    for same_bytes in (replace(update, num_samples=4000), replace(update, num_steps=9),
                       replace(update, metadata={"preset": "other"})):  # a new weight was silently ignored
        with pytest.raises(TransportError) as refused:
            client.submit(same_bytes)
        assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert "these bytes were accepted from client 'c1' in round 0 with other metadata" in refused.value.message
    assert state_dir_snapshot(tmp_path / "state") == before
    other = make_update(STATE, seed=3, num_samples=2)
    connect(server, "c2").submit(other)
    server.wait_for_round(1, timeout_s=10)
    assert_states_close(server.global_state(), reference_fedavg(STATE, [update, other]), atol=1e-7)


def test_every_rpc_refuses_an_unauthenticated_client(start_server, connect, tokens, tmp_path):
    server = start_server(STATE, clients=tokens)
    before = state_dir_snapshot(tmp_path / "state")
    intruder = connect(server, "c1", token="wrong-token-but-long-enough")
    for call in (intruder.join, intruder.status, intruder.fetch_global,
                 lambda: intruder.submit(make_update(STATE, seed=1, num_samples=1))):
        with pytest.raises(TransportError) as refused:
            call()
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert state_dir_snapshot(tmp_path / "state") == before
    assert server.status().joined_clients == 0


def test_a_retry_after_the_round_closed_is_a_duplicate_not_a_refusal(start_server, connect, tokens, tmp_path):
    """The acknowledgement of an accepted update was lost; the retry comes after the round closed."""
    server = start_server(STATE, clients=tokens, round_deadline_s=None)
    client = connect(server, "c1")
    update = make_update(STATE, seed=1, num_samples=4)
    first = client.submit(update)
    server.wait_for_round(1, timeout_s=10)
    before = state_dir_snapshot(tmp_path / "state")
    again = client.submit(update)
    assert again.duplicate and (again.round, again.digest, again.accepted_in_round) == (0, first.digest, 1)
    assert state_dir_snapshot(tmp_path / "state") == before
    with pytest.raises(TransportError) as other_weight:
        client.submit(replace(update, num_samples=400))
    assert other_weight.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "other metadata" in other_weight.value.message


def test_a_wrong_round_refusal_names_the_open_round(start_server, connect, tokens):
    server = start_server(STATE, clients=tokens, round_deadline_s=None)
    connect(server, "c2").submit(make_update(STATE, seed=2, num_samples=1))
    server.wait_for_round(1, timeout_s=10)
    with pytest.raises(TransportError) as late:
        connect(server, "c1").submit(make_update(STATE, seed=1, num_samples=1, round=0))
    assert late.value.code == grpc.StatusCode.FAILED_PRECONDITION and late.value.open_round == 1
    assert "guard.begin_round(1)" in late.value.message


def test_a_bulky_safetensors_metadata_block_is_refused_from_its_first_bytes(start_server, connect, tokens, tmp_path):
    """A 40 MB metadata block cost 34-45 s of server CPU, and was parsed again under the lock."""
    server = start_server(STATE, clients=tokens, round_deadline_s=None)
    before = state_dir_snapshot(tmp_path / "state")
    payload = TensorPayload(_GOOD, metadata={"junk": "x" * (8 << 20)}).to_bytes()
    with pytest.raises(grpc.RpcError) as refused:
        _send(server, tokens, payload=payload)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plus at most 65536 of metadata" in refused.value.details()
    assert state_dir_snapshot(tmp_path / "state") == before
    assert not connect(server, "c1").submit(make_update(STATE, seed=1, num_samples=2)).duplicate


def test_a_digest_in_the_header_or_in_the_trailer_is_the_same_update(start_server, connect, tokens, tmp_path):
    """Clients before the UpdateTrailer send the digest in the header: the server takes both, and a
    retry in the other form is recognised as the update already accepted."""
    server = start_server(STATE, clients=tokens, min_clients=2, round_deadline_s=None)
    first = _send(server, tokens)  # the digest in the header
    before = state_dir_snapshot(tmp_path / "state")
    again = connect(server, "c1").submit(make_update(STATE, seed=1, num_samples=2))  # in the trailer
    assert (first.duplicate, again.duplicate) == (False, True) and again.digest == first.digest
    assert state_dir_snapshot(tmp_path / "state") == before
    with pytest.raises(grpc.RpcError) as other_weight:
        _send(server, tokens, num_samples=3)
    assert other_weight.value.code() == grpc.StatusCode.ALREADY_EXISTS
