"""The leakage report in an update's header: encoded, decoded, checked, and the server's maximum.

Every refusal leaves the state directory byte for byte, the status and the global model as they
were; then the same client's compliant update is accepted in the same round, and the round's
aggregate is FedAvg of that update alone.
"""
from __future__ import annotations

import blake3
import math
from dataclasses import fields, replace

import grpc
import pytest
from transport_helpers import (assert_states_close, make_update, raw_submit, reference_fedavg, small_state,
                               state_dir_snapshot, write_private)

from gradguard.cli import build_parser, main
from gradguard.leakage import LeakageEstimate
from gradguard.transport import AggregatorConfig, TransportError
from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.transport.codec import TensorPayload, load_update, save_update, update_header
from gradguard.transport.validation import decode_leakage

STATE = small_state()
ESTIMATE = LeakageEstimate(threat="honest_server", estimators=("noised_input_bound", "gradient_probe"),
                           target_db=1.0, psnr_above_prior_max=0.9, psnr_above_prior_mean=0.4,
                           ssim_above_prior_max=0.05, ssim_above_prior_mean=0.01, amplitude_max=0.8,
                           amplitude_mean=0.3, samples=8, noised_samples=5, met=True)


def _update(leakage: LeakageEstimate | None, *, seed: int = 1):
    update = make_update(STATE, seed=seed, num_samples=2, client_id="c1")
    update.leakage = leakage
    return update


def _header(leakage: LeakageEstimate | None) -> pb.UpdateHeader:
    update = _update(leakage)
    return update_header(update, TensorPayload(update.tensors), client_id="c1")


def test_the_report_mirrors_the_estimate_field_for_field():
    assert [f.name for f in pb.LeakageReport.DESCRIPTOR.fields] == [f.name for f in fields(LeakageEstimate)]


@pytest.mark.parametrize("estimate", [
    ESTIMATE,
    # No noise under a malicious server: exact recovery, an infinite estimate; SSIM not computed (volumes).
    replace(ESTIMATE, threat="malicious_server", estimators=("noised_input_bound",), psnr_above_prior_max=math.inf,
            psnr_above_prior_mean=math.inf, ssim_above_prior_max=math.nan, ssim_above_prior_mean=math.nan,
            amplitude_max=0.0, amplitude_mean=0.0, noised_samples=0, met=False),
], ids=["finite", "infinite_without_ssim"])
def test_the_header_carries_the_estimate_and_the_server_reads_it_back(estimate):
    header = _header(estimate)
    assert header.HasField("leakage")
    wire = pb.UpdateHeader.FromString(header.SerializeToString())
    decoded = decode_leakage(wire)
    assert decoded is not None and decoded.to_dict() == estimate.to_dict()  # to_dict: NaN compares as None
    assert not _header(None).HasField("leakage") and decode_leakage(_header(None)) is None


def test_a_saved_update_keeps_its_leakage_report(tmp_path):
    for estimate in (ESTIMATE, replace(ESTIMATE, psnr_above_prior_max=math.inf, ssim_above_prior_max=math.nan)):
        save_update(_update(estimate), tmp_path / "u.safetensors")
        loaded = load_update(tmp_path / "u.safetensors")
        assert loaded.leakage is not None and loaded.leakage.to_dict() == estimate.to_dict()
    save_update(_update(None), tmp_path / "none.safetensors")
    assert load_update(tmp_path / "none.safetensors").leakage is None


def _set(**values):
    def change(report: pb.LeakageReport) -> None:
        for name, value in values.items():
            setattr(report, name, value)
    return change


MALFORMED = {
    "nan_psnr": (_set(psnr_above_prior_max=math.nan), "psnr_above_prior_max must be a number, got nan"),
    "nan_ssim_sent": (_set(ssim_above_prior_mean=math.nan), "ssim_above_prior_mean must be a number, got nan"),
    "negative_samples": (_set(samples=-1), "samples must be an integer >= 0, got -1"),
    "more_noised_than_samples": (_set(noised_samples=9), "noised_samples (9) must be at most samples (8)"),
    "unknown_threat": (_set(threat="curious_neighbour"),
                       "threat 'curious_neighbour' is not one of ['honest_server', 'malicious_server']"),
    "negative_amplitude": (_set(amplitude_mean=-0.1), "amplitude_mean must be finite and >= 0"),
    "zero_target": (_set(target_db=0.0), "target_db must be finite and > 0"),
}


def _raw_submit(server, tokens, change):
    """The good update with its header's leakage report changed by ``change``, sent as is."""
    update = _update(ESTIMATE)
    payload = TensorPayload(update.tensors)
    header, data = update_header(update, payload, client_id="c1"), payload.to_bytes()
    header.digest = blake3.blake3(data).hexdigest()
    change(header.leakage)
    return raw_submit(server.address, "c1", tokens["c1"], header, data)


def _refused_and_unchanged(server, tmp_path, call, code, message):
    before, status_before = state_dir_snapshot(tmp_path / "state"), server.status()
    with pytest.raises((grpc.RpcError, TransportError)) as refused:
        call()
    err = refused.value
    got, details = (err.code, err.message) if isinstance(err, TransportError) else (err.code(), err.details())
    assert got == code, details
    assert message in details, details
    assert state_dir_snapshot(tmp_path / "state") == before
    assert server.status() == status_before
    assert_states_close(server.global_state(), STATE, atol=0)
    return details


def _then_the_compliant_update_closes_the_round(server, client):
    good = _update(ESTIMATE, seed=5)
    assert client.submit(good).accepted_in_round == 1
    server.wait_for_round(1, timeout_s=10)
    assert_states_close(server.global_state(), reference_fedavg(STATE, [good]), atol=1e-7)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_report_is_refused_with_or_without_a_maximum(case, start_server, connect, tokens, tmp_path):
    change, message = MALFORMED[case]
    server = start_server(STATE, clients=tokens, round_deadline_s=None)  # no maximum: malformed is still refused
    client = connect(server, "c1")
    client.join()
    _refused_and_unchanged(server, tmp_path, lambda: _raw_submit(server, tokens, change),
                           grpc.StatusCode.INVALID_ARGUMENT, f"the header's leakage report is malformed: leakage "
                                                             f"{message}")
    _then_the_compliant_update_closes_the_round(server, client)


REFUSED = {
    "over_the_maximum": (replace(ESTIMATE, target_db=6.0, psnr_above_prior_max=4.25),
                         ["estimated to leak up to 4.25 dB above the prior", "maximum of 3 dB",
                          "fix: train this round again with GuardConfig(leakage_target_db=3) or lower"]),
    "infinite": (replace(ESTIMATE, threat="malicious_server", psnr_above_prior_max=math.inf, met=False),
                 ["up to inf dB above the prior", "at most 3 dB", "fix:"]),
    "target_missed": (replace(ESTIMATE, psnr_above_prior_max=2.5, met=False),
                      ["missed its own target of 1 dB", "up to 2.50 dB", "at most 3 dB",
                       "larger max_amplitude"]),
    "no_report": (None, ["carries no leakage report", "at most 3 dB", "--max-leakage-db",
                         "fix: train this round again with GuardConfig(leakage_target_db=3)"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_update_over_the_servers_maximum_is_refused_and_changes_nothing(case, start_server, connect, tokens,
                                                                           tmp_path):
    estimate, messages = REFUSED[case]
    server = start_server(STATE, clients=tokens, round_deadline_s=None, max_leakage_db=3.0)
    client = connect(server, "c1")
    client.join()
    message = _refused_and_unchanged(server, tmp_path, lambda: client.submit(_update(estimate)),
                                     grpc.StatusCode.FAILED_PRECONDITION, messages[0])
    for part in messages[1:]:
        assert part in message, message
    _then_the_compliant_update_closes_the_round(server, client)


def test_without_a_maximum_an_update_without_a_report_is_accepted(start_server, connect, tokens):
    server = start_server(STATE, clients=tokens, round_deadline_s=None)
    client = connect(server, "c1")
    client.join()
    plain = _update(None)
    assert client.submit(plain).accepted_in_round == 1
    server.wait_for_round(1, timeout_s=10)
    assert_states_close(server.global_state(), reference_fedavg(STATE, [plain]), atol=1e-7)


def test_an_update_at_the_maximum_is_accepted(start_server, connect, tokens):
    server = start_server(STATE, clients=tokens, round_deadline_s=None, max_leakage_db=3.0)
    client = connect(server, "c1")
    client.join()
    assert client.submit(_update(replace(ESTIMATE, target_db=3.0, psnr_above_prior_max=3.0))).accepted_in_round == 1


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_the_maximum_is_validated(bad):
    with pytest.raises(ValueError, match=r"\['max_leakage_db'\].*max_leakage_db finite and > 0"):
        AggregatorConfig(max_leakage_db=bad)


def test_serve_takes_the_maximum_on_its_command_line(tmp_path, monkeypatch):
    from gradguard.transport import server as server_module

    serve = ["serve", "--state-dir", str(tmp_path / "state"),
             "--clients", str(write_private(tmp_path / "clients.json", "{}"))]
    assert build_parser(serve).parse_args(serve).max_leakage_db is None  # no maximum unless asked
    built = {}

    def capture(*_args, config, **_kwargs):
        built["config"] = config
        raise ValueError("stopped before serving")

    monkeypatch.setattr(server_module, "AggregatorServer", capture)
    with pytest.raises(SystemExit, match="stopped before serving"):
        main([*serve, "--max-leakage-db", "2.5"])
    assert built["config"].max_leakage_db == 2.5
    with pytest.raises(SystemExit, match=r"gradguard serve: invalid AggregatorConfig field\(s\) \['max_leakage_db'\]"):
        main([*serve, "--max-leakage-db", "-1"])
