"""The wire format: safetensors round trips, lean file reads, saved updates, generated code in step."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import blake3
import pytest
import safetensors
import safetensors.torch
import torch

import gradguard.transport._generated.v1 as generated
from gradguard.transport.codec import (TensorPayload, decode_tensors, encode_tensors, iter_tensors, load_update,
                                       save_update, submit_messages, write_tensors)
from gradguard.transport import wire
from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.transport.server import _submit_request
from gradguard.transport.wire import (FLUSH_BEHIND_BYTES, BackgroundDigest, HashingWriter, MalformedSafetensors,
                                      data_message, data_view, file_digest, from_float64, read_ahead, read_header,
                                      to_float64)
from gradguard.update import ProtectedUpdate

ROOT = Path(__file__).resolve().parents[2]
TENSORS = {
    "f32": torch.randn(3, 5),
    "bf16": torch.randn(7).to(torch.bfloat16),
    "f16": torch.randn(2, 2).half(),
    "f64": torch.randn(4, dtype=torch.float64),
    "count": torch.tensor(12345678901, dtype=torch.int64),
    "mask": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 3),
    "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_generated_code_is_in_step_with_the_proto():
    recorded = (Path(generated.__file__).parent / "SOURCE.sha256").read_text().split()
    protos = sorted((ROOT / "protos/gradguard/v1").glob("*.proto"))
    assert recorded[1::2] == [p.name for p in protos]
    assert recorded[0::2] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in protos], \
        "a .proto changed without regenerating: run `make proto` and commit gradguard/transport/_generated"


def test_encode_decode_round_trip_every_dtype():
    _assert_same(decode_tensors(encode_tensors(TENSORS)), TENSORS)


def test_iter_tensors_reads_what_safetensors_reads(tmp_path):
    write_tensors(tmp_path / "t.safetensors", TENSORS)
    _assert_same(dict(iter_tensors(tmp_path / "t.safetensors")), TENSORS)
    _assert_same(safetensors.torch.load_file(str(tmp_path / "t.safetensors")), TENSORS)


def test_iter_tensors_refuses_a_malformed_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(encode_tensors(TENSORS)[:-3])
    with pytest.raises(MalformedSafetensors):
        list(iter_tensors(tmp_path / "bad.safetensors"))


def test_payload_chunks_checksum_and_file_agree_with_its_bytes(tmp_path):
    payload = TensorPayload(TENSORS)
    data = payload.to_bytes()
    assert len(data) == payload.total_bytes
    chunks = list(payload.chunks(1000))
    assert all(len(c) == 1000 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 1000
    assert b"".join(chunks) == data
    assert payload.write(tmp_path / "p.safetensors") == payload.digest() == blake3.blake3(data).hexdigest()
    assert file_digest(tmp_path / "p.safetensors") == payload.digest()


def test_the_numpy_reader_agrees_with_safetensors_on_layout_and_values(tmp_path):
    write_tensors(tmp_path / "t.safetensors", TENSORS)
    header = read_header(tmp_path / "t.safetensors")
    with safetensors.safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert set(header.entries) == set(f.keys())
    raw = (tmp_path / "t.safetensors").read_bytes()
    for name in ("f32", "bf16", "f16", "f64"):
        entry = header.entries[name]
        values = to_float64(entry.code, raw[header.data_start + entry.start:header.data_start + entry.end])
        assert torch.equal(torch.from_numpy(values), TENSORS[name].double().reshape(-1)), name
        # float64 -> the dtype rounds to nearest, so a value of the dtype survives the round trip
        assert from_float64(entry.code, values) == raw[header.data_start + entry.start:header.data_start + entry.end]


def test_bfloat16_rounding_matches_torch():
    values = torch.randn(1000, dtype=torch.float64) * 1e3
    want = values.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert from_float64("BF16", values.numpy()) == want


def test_saved_update_round_trips_with_its_metadata(tmp_path):
    update = ProtectedUpdate(tensors={"w": torch.randn(2, 3)}, kind="delta", num_samples=8, num_steps=2, round=4,
                             client_id="c1", learning_rate=0.1, epsilon=3.5, delta=1e-5, metadata={"preset": "default"})
    save_update(update, tmp_path / "u.safetensors")
    loaded = load_update(tmp_path / "u.safetensors")
    _assert_same(loaded.tensors, update.tensors)
    assert {**vars(loaded), "tensors": None} == {**vars(update), "tensors": None}
    write_tensors(tmp_path / "plain.safetensors", update.tensors)
    with pytest.raises(ValueError, match="save_update"):
        load_update(tmp_path / "plain.safetensors")


def _flushers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gradguard-flush-behind"]


def test_a_file_flushed_behind_its_writer_holds_what_was_written(tmp_path, monkeypatch):
    flushed = threading.Event()
    monkeypatch.setattr(wire.os, "fdatasync", lambda fd: (os.fsync(fd), flushed.set()))
    block = os.urandom(1 << 20)
    with HashingWriter(tmp_path / "u.part", flush_behind=True) as writer:
        for _ in range(2 * FLUSH_BEHIND_BYTES // len(block) + 1):
            writer.write(block)
        assert flushed.wait(30), "the file is flushed while it is written"
        writer.fsync()
        assert writer.hexdigest() == file_digest(tmp_path / "u.part")
    assert (tmp_path / "u.part").stat().st_size == writer.written and not _flushers()


def test_a_failed_flush_behind_the_writer_fails_the_fsync(tmp_path, monkeypatch):
    tried = threading.Event()

    def broken(fd):
        tried.set()
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(wire.os, "fdatasync", broken)
    writer = HashingWriter(tmp_path / "u.part", flush_behind=True)
    writer.write(b"x" * FLUSH_BEHIND_BYTES)
    assert tried.wait(30)  # the flush behind the writer ran (and failed)
    with pytest.raises(OSError, match="Input/output error"):
        writer.fsync()
    writer.close()
    assert not _flushers()


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, 1 << 20])
def test_a_hand_framed_data_chunk_is_what_protobuf_writes_and_reads(size):
    data = os.urandom(size)
    parts = [data[:size // 3], memoryview(data)[size // 3:]]
    message = data_message(parts)
    assert message == pb.SubmitUpdateRequest(data=data).SerializeToString()
    assert pb.SubmitUpdateRequest.FromString(message).data == data
    assert bytes(data_view(message)) == data


def test_every_message_but_a_bare_data_chunk_is_left_to_protobuf():
    data = os.urandom(1000)
    bare = data_message([data])
    unknown_field = bare + b"\x78\x01"  # field 15 = 1: protobuf keeps the data and skips the field
    others = [b"", pb.SubmitUpdateRequest(header=pb.UpdateHeader(round=3)).SerializeToString(),
              pb.SubmitUpdateRequest(trailer=pb.UpdateTrailer(digest="a" * 64)).SerializeToString(),
              unknown_field, bare[:-1], bare + bare, b"\x12" + b"\xff" * 11]
    assert all(data_view(message) is None for message in others)
    assert _submit_request(unknown_field).data == data
    assert _submit_request(others[1]).header.round == 3
    assert bytes(_submit_request(bare)) == data


def test_a_digest_computed_behind_its_caller_is_the_digest_of_everything_in_order(tmp_path):
    blocks = [os.urandom(n) for n in (0, 1, 1 << 20, 4097, 3)]
    digest = BackgroundDigest()
    digest.update(*blocks[:2])
    for block in blocks[2:]:
        digest.update(memoryview(block))
    assert digest.hexdigest() == blake3.blake3(b"".join(blocks)).hexdigest()
    digest.close()
    with HashingWriter(tmp_path / "u.part", hash_behind=True) as writer:
        for block in blocks:
            writer.write(block)
        assert writer.hexdigest() == file_digest(tmp_path / "u.part") == digest.hexdigest()
    assert not [t for t in threading.enumerate() if t.name.startswith("gradguard-hash")]


def test_the_submitted_messages_carry_the_payload_and_its_digest():
    payload = TensorPayload(TENSORS)
    messages = [pb.SubmitUpdateRequest.FromString(m) for m in submit_messages(pb.UpdateHeader(round=2), payload,
                                                                             chunk_bytes=7)]
    assert messages[0].header.round == 2
    assert b"".join(m.data for m in messages[1:-1]) == payload.to_bytes()
    assert messages[-1].trailer.digest == payload.digest()


def test_items_read_ahead_come_in_order_and_a_failure_reaches_the_consumer():
    assert list(read_ahead(iter(range(100)), 2)) == list(range(100))

    def failing():
        yield 1
        raise OSError("the source failed")

    items = read_ahead(failing(), 1)
    assert next(items) == 1
    with pytest.raises(OSError, match="the source failed"):
        next(items)


def test_a_consumer_that_stops_early_ends_the_read_ahead_thread():
    before = set(threading.enumerate())
    items = read_ahead(iter(range(10**6)), 1)
    assert next(items) == 0
    (helper,) = [t for t in set(threading.enumerate()) - before if t.name == "gradguard-read-ahead"]
    items.close()
    helper.join(timeout=5)
    assert not helper.is_alive()
