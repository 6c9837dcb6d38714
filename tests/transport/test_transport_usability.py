"""A serve/client pair people can run: a server that outlives its last round without torch, JSON
that parses, a client that follows the server's round (the README's snippet: tests/test_readme.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from transport_helpers import make_update, small_state, write_private

from gradguard.cli import main
from gradguard.transport import AggregatorClient, RetryPolicy, TransportError, generate_tokens
from gradguard.transport.codec import write_tensors

STATE = small_state()
# Runs `gradguard serve` with the given arguments; at exit it reports whether torch was ever
# imported and the process's peak resident memory.
SERVE_AND_REPORT = """
import atexit, sys
def report():
    peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
    print('REPORT', 'torch' in sys.modules, int(peak) * 1024, flush=True)
atexit.register(report)
from gradguard.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_runs_its_rounds_serves_the_final_model_and_never_imports_torch(tmp_path):
    tokens = generate_tokens(["c1"])
    write_private(tmp_path / "clients.json", json.dumps(tokens))
    write_tensors(tmp_path / "model.safetensors", STATE)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE_AND_REPORT, "serve", "--state-dir", str(tmp_path / "state"),
         "--clients", str(tmp_path / "clients.json"), "--model", str(tmp_path / "model.safetensors"),
         "--address", "127.0.0.1:0", "--round-deadline", "0", "--rounds", "1", "--linger", "3",
         "--aggregation", "median"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = server.stdout.readline().split()[-1]
        retry = RetryPolicy(attempts=100, initial_backoff_s=0.05, max_backoff_s=0.25)
        with AggregatorClient(address, client_id="c1", token=tokens["c1"], retry=retry) as client:
            client.submit(make_update(STATE, seed=1, num_samples=2))
            client.wait_for_round(1, timeout_s=30, poll_s=0.05)
            round_index, final = client.fetch_global()  # after the last round, the final model is served
            assert round_index == 1 and final.keys() == STATE.keys()
            with pytest.raises(TransportError) as finished:
                client.submit(make_update(STATE, seed=2, num_samples=2, round=1))
            assert finished.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "the federation is finished" in finished.value.message
        out, err = server.communicate(timeout=60)  # --linger: it exits by itself
    finally:
        server.kill()
    assert server.returncode == 0, err
    torch_loaded, peak = out.split("REPORT")[-1].split()
    assert torch_loaded == "False", "gradguard serve imported torch"
    assert int(peak) < 150 * 2**20, f"gradguard serve peaked at {int(peak) / 2**20:.0f} MB"


def test_status_is_valid_json_without_a_deadline(start_server, tokens, tmp_path, capsys):
    server = start_server(STATE, clients=tokens, round_deadline_s=None)
    write_private(tmp_path / "token", tokens["c1"])
    assert main(["client", "--address", server.address, "--client-id", "c1", "--token-file",
                 str(tmp_path / "token"), "status"]) == 0

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    status = json.loads(capsys.readouterr().out, parse_constant=no_constants)
    assert status["seconds_to_deadline"] is None and status["round"] == 0


def test_a_late_client_follows_the_open_round(start_server, connect, tokens):
    server = start_server(STATE, clients=tokens, round_deadline_s=None)
    connect(server, "c2").submit(make_update(STATE, seed=2, num_samples=1))
    server.wait_for_round(1, timeout_s=10)
    late = connect(server, "c1")
    assert late.join().round == 1
    with pytest.raises(TransportError) as refused:
        late.submit(make_update(STATE, seed=1, num_samples=1, round=0))
    retry = make_update(STATE, seed=1, num_samples=1, round=refused.value.open_round)
    assert late.submit(retry).round == 1


def test_waits_have_default_timeouts():
    import inspect
    from gradguard.transport import AggregatorServer
    for wait in (AggregatorClient.wait_for_round, AggregatorServer.wait_for_round):
        assert inspect.signature(wait).parameters["timeout_s"].default == 600.0
