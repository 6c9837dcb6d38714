"""A server killed with SIGKILL mid-round resumes that round with every update it had acknowledged."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

from transport_helpers import assert_states_close, make_update, reference_fedavg, small_state, write_private

from gradguard.transport import AggregatorClient, RetryPolicy, generate_tokens
from gradguard.transport.codec import write_tensors

STATE = small_state()


def _serve(tmp_path: Path, address: str) -> tuple[subprocess.Popen, str]:
    """``gradguard serve`` in a subprocess; returns it and the address it listens on."""
    log = open(tmp_path / "server.log", "a")
    process = subprocess.Popen(
        [sys.executable, "-m", "gradguard.cli", "serve", "--state-dir", str(tmp_path / "state"),
         "--clients", str(tmp_path / "clients.json"), "--model", str(tmp_path / "model.safetensors"),
         "--address", address, "--min-clients", "3", "--round-deadline", "0"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    line = process.stdout.readline()
    assert line.startswith("listening on "), (line, (tmp_path / "server.log").read_text())
    return process, line.split()[-1]


def test_sigkill_mid_round_loses_no_acknowledged_update(tmp_path, caplog):
    tokens = generate_tokens(["c1", "c2", "c3"])
    write_private(tmp_path / "clients.json", json.dumps(tokens))
    write_tensors(tmp_path / "model.safetensors", STATE)
    updates = {cid: make_update(STATE, seed=i, num_samples=2 ** i, client_id=cid) for i, cid in enumerate(tokens)}
    # ~100 s: a loaded machine starts slowly
    retry = RetryPolicy(attempts=400, initial_backoff_s=0.05, max_backoff_s=0.25)
    server, address = _serve(tmp_path, "127.0.0.1:0")
    clients = {cid: AggregatorClient(address, client_id=cid, token=tokens[cid], retry=retry) for cid in tokens}
    try:
        for cid in ("c1", "c2"):
            assert clients[cid].submit(updates[cid]).accepted_in_round in (1, 2)
        server.kill()  # SIGKILL: no chance to flush or clean up
        server.wait()

        acks = []
        with caplog.at_level(logging.INFO, logger="gradguard.transport.client"):
            late = threading.Thread(target=lambda: acks.append(clients["c3"].submit(updates["c3"])))
            late.start()  # meets a dead server and retries with backoff...
            time.sleep(0.5)
            server, _ = _serve(tmp_path, address)  # ...until the restarted one answers
            late.join(timeout=60)
        assert "server unavailable" in caplog.text
        assert acks and acks[0].accepted_in_round == 3  # c1's and c2's updates were resumed

        status = clients["c1"].wait_for_round(1, timeout_s=30, poll_s=0.05)
        assert status.round == 1
        _, fetched = clients["c2"].fetch_global()
        assert_states_close(fetched, reference_fedavg(STATE, list(updates.values())), atol=1e-7)
        assert "resumed round 0" in (tmp_path / "server.log").read_text()
    finally:
        for client in clients.values():
            client.close()
        server.kill()
        server.wait()
