"""The state directory is private, never wiped by accident, and a bad one is refused cleanly."""
from __future__ import annotations

import datetime
import json
import logging
import stat

import pytest
from cryptography import x509
from transport_helpers import make_update, server_certificate, small_state, state_dir_snapshot, write_private

import gradguard.transport.store as store_module
from gradguard.cli import main
from gradguard.transport import AggregatorServer, ServerTLS
from gradguard.transport.auth import certificate_not_after

STATE = small_state()


def _trained_state_dir(tmp_path, start_server, connect) -> None:
    """A state directory at round 1 with one accepted update of round 1."""
    server = start_server(STATE, clients={"c1": "t" * 16, "c2": "u" * 16}, round_deadline_s=None, min_clients=1)
    connect(server, "c1", token="t" * 16).submit(make_update(STATE, seed=1, num_samples=2))
    server.wait_for_round(1, timeout_s=10)
    connect(server, "c2", token="u" * 16).submit(make_update(STATE, seed=2, num_samples=2, round=1))
    server.stop(0)


def test_rounds_without_state_json_are_refused_with_the_way_to_recover(tmp_path, start_server, connect):
    _trained_state_dir(tmp_path, start_server, connect)
    (tmp_path / "state" / "state.json").unlink()
    kept = state_dir_snapshot(tmp_path / "state")
    with pytest.raises(ValueError) as refused:
        AggregatorServer(STATE, state_dir=tmp_path / "state", clients={"c1": "t" * 16})
    message = str(refused.value)
    assert "no state.json, so the server refuses to start there" in message
    assert f"--model {tmp_path / 'state' / 'global-000001.safetensors'}" in message
    assert f"mv {tmp_path / 'state'} {tmp_path / 'state'}.bak" in message
    assert state_dir_snapshot(tmp_path / "state") == kept  # the trained model and the update are still there


@pytest.mark.parametrize("content", [
    b"[]", b'"accepted"', b"null", b"{}", b"\xff\xfe not utf-8", b"[" * 100000,
    b'{"format": 3, "round": 0, "accepted": []}',
])
def test_a_malformed_state_json_of_any_shape_is_a_clean_refusal(content, tmp_path, start_server, connect):
    _trained_state_dir(tmp_path, start_server, connect)
    (tmp_path / "state" / "state.json").write_bytes(content)
    kept = state_dir_snapshot(tmp_path / "state")
    with pytest.raises(ValueError, match="state.json is unreadable"):
        AggregatorServer(STATE, state_dir=tmp_path / "state", clients={"c1": "t" * 16})
    assert state_dir_snapshot(tmp_path / "state") == kept


def test_a_state_directory_of_gradguard_0_1_is_refused_with_the_way_forward(tmp_path, start_server, connect):
    # gradguard 0.1 wrote SHA-256 digests (format 2); they cannot match the BLAKE3 digests of
    # its updates' retries or of its files, so the server says what to do instead of failing later.
    _trained_state_dir(tmp_path, start_server, connect)
    path = tmp_path / "state" / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 2}))
    kept = state_dir_snapshot(tmp_path / "state")
    with pytest.raises(ValueError, match="SHA-256 digests of gradguard 0.1.*--state-dir NEW_DIR --model"):
        AggregatorServer(STATE, state_dir=tmp_path / "state", clients={"c1": "t" * 16})
    assert state_dir_snapshot(tmp_path / "state") == kept


def test_every_field_of_state_json_is_checked(tmp_path, start_server, connect):
    _trained_state_dir(tmp_path, start_server, connect)
    path = tmp_path / "state" / "state.json"
    good = json.loads(path.read_text())
    bad_values = [("round", "1"), ("round", True), ("accepted", []), ("joined", "c1"), ("past", {"c1": []}),
                  ("global_file", "../../etc/passwd"), ("extra", 1)]
    for key, value in bad_values:
        path.write_text(json.dumps({**good, key: value}))
        with pytest.raises(ValueError, match="state.json is unreadable"):
            AggregatorServer(STATE, state_dir=tmp_path / "state", clients={"c1": "t" * 16})
    record = next(iter(good["accepted"].values()))
    path.write_text(json.dumps({**good, "accepted": {"c2": {**record, "num_samples": "2"}}}))
    with pytest.raises(ValueError, match=r"accepted\['c2'\].num_samples is a str"):
        AggregatorServer(STATE, state_dir=tmp_path / "state", clients={"c1": "t" * 16})


def test_the_state_directory_is_private(tmp_path, start_server, connect):
    _trained_state_dir(tmp_path, start_server, connect)
    for path in [tmp_path / "state", *(tmp_path / "state").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_a_loose_existing_state_directory_is_tightened(tmp_path, caplog):
    (tmp_path / "state").mkdir(mode=0o755)
    (tmp_path / "state").chmod(0o755)
    with caplog.at_level(logging.WARNING):
        AggregatorServer(STATE, state_dir=tmp_path / "state", clients={"c1": "t" * 16})
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert "readable by other users" in caplog.text


def test_new_directories_are_flushed_in_their_parents(tmp_path, start_server, connect, monkeypatch):
    flushed = []
    real = store_module._fsync
    monkeypatch.setattr(store_module, "_fsync", lambda path: (flushed.append(path), real(path)))
    server = start_server(STATE, clients={"c1": "t" * 16}, round_deadline_s=None, min_clients=2)
    assert tmp_path in flushed  # the state directory's own entry
    connect(server, "c1", token="t" * 16).submit(make_update(STATE, seed=1, num_samples=2))
    assert tmp_path / "state" / "updates" in flushed  # the new round's folder
    assert tmp_path / "state" / "updates" / "round-000000" in flushed  # the update's entry in it


def test_secret_files_readable_by_others_are_refused(tmp_path, capsys):
    (tmp_path / "clients.json").write_text(json.dumps({"c1": "t" * 16}))
    (tmp_path / "clients.json").chmod(0o644)
    with pytest.raises(SystemExit, match=f"chmod 600 {tmp_path / 'clients.json'}"):
        main(["serve", "--state-dir", str(tmp_path / "s"), "--clients", str(tmp_path / "clients.json")])
    (tmp_path / "token").write_text("t" * 16)
    with pytest.raises(SystemExit, match="can be read by other users"):
        main(["client", "--client-id", "c1", "--token-file", str(tmp_path / "token"), "status"])


def test_a_missing_or_broken_clients_file_is_a_clean_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist; write the clients' tokens there"):
        main(["serve", "--state-dir", str(tmp_path / "s"), "--clients", str(tmp_path / "nope.json")])
    write_private(tmp_path / "clients.json", "{not json")
    with pytest.raises(SystemExit, match="is not JSON"):
        main(["serve", "--state-dir", str(tmp_path / "s"), "--clients", str(tmp_path / "clients.json")])
    write_private(tmp_path / "clients.json", "[]")
    with pytest.raises(SystemExit, match="no clients"):
        main(["serve", "--state-dir", str(tmp_path / "s"), "--clients", str(tmp_path / "clients.json"),
              "--model", str(tmp_path / "m.safetensors")])


@pytest.mark.parametrize("days, words", [(-2, "EXPIRED"), (3, "expires on"), (30, None)])
def test_a_certificate_expired_or_expiring_within_a_week_is_warned_about(days, words, tmp_path, caplog):
    cert, key = server_certificate(days=days)
    want = x509.load_pem_x509_certificate(cert).not_valid_after_utc
    assert abs(certificate_not_after(cert) - want) < datetime.timedelta(seconds=1)
    server = AggregatorServer(STATE, state_dir=tmp_path / "s", clients={"c1": "t" * 16}, tls=ServerTLS(cert, key))
    with caplog.at_level(logging.WARNING):
        server.start()
    server.stop(0)
    if words is None:
        assert "certificate" not in caplog.text
    else:
        assert words in caplog.text
