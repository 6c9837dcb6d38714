"""`gradguard client ...` against an in-process server (the SIGKILL test drives `gradguard serve`)."""
from __future__ import annotations

import json

import grpc
import pytest
from transport_helpers import assert_states_close, make_update, reference_fedavg, small_state, write_private

from gradguard.cli import main
from gradguard.transport.codec import iter_tensors, save_update

STATE = small_state()


def test_client_commands_join_fetch_submit_wait(start_server, tokens, tmp_path, capsys):
    server = start_server(STATE, clients=tokens, round_deadline_s=None)
    write_private(tmp_path / "token", tokens["c1"] + "\n")
    base = ["client", "--address", server.address, "--client-id", "c1", "--token-file", str(tmp_path / "token")]

    def run(*args: str) -> dict:
        assert main([*base, *args]) == 0
        return json.loads(capsys.readouterr().out)

    assert run("join") == {"round": 0, "tensors": len(STATE), "min_clients": 1}
    assert run("fetch", "--out", str(tmp_path / "global.safetensors"))["round"] == 0
    assert_states_close(dict(iter_tensors(tmp_path / "global.safetensors")), STATE, atol=0)
    update = make_update(STATE, seed=3, num_samples=5, client_id="c1")
    save_update(update, tmp_path / "update.safetensors")
    assert run("submit", str(tmp_path / "update.safetensors"))["accepted_in_round"] == 1
    assert run("wait", "--round", "1", "--timeout", "10")["round"] == 1
    assert_states_close(server.global_state(), reference_fedavg(STATE, [update]), atol=1e-7)

    assert run("submit", str(tmp_path / "update.safetensors"))["duplicate"]  # a retry after the round closed
    save_update(make_update(STATE, seed=4, num_samples=5, client_id="c1"), tmp_path / "late.safetensors")
    assert main([*base, "submit", str(tmp_path / "late.safetensors")]) == 1
    assert grpc.StatusCode.FAILED_PRECONDITION.name in capsys.readouterr().err


def test_client_without_a_token_says_how_to_give_one(monkeypatch, capsys):
    monkeypatch.delenv("GRADGUARD_TOKEN", raising=False)
    with pytest.raises(SystemExit, match=r"--token-file or \$GRADGUARD_TOKEN"):
        main(["client", "--client-id", "c1", "status"])
