"""The gRPC transport on loopback, in one run.

1. Throughput: a ResNet-18-sized update (about 45 MB) submitted through AggregatorClient to a
   `gradguard serve` process (encode, stream while hashing, check, persist, ack: the whole call),
   vs the same bytes sent over a plain TCP socket to another process that writes them to a file
   on the same disk and, like the server, fsyncs it before its ack (or not, against the server
   without fsync; or keeps them in memory), and vs writing them to a file and fsyncing it (the
   disk's bound on a durable ack). Median of --repeats. Two servers run side by side, one with
   the default fsync before each acknowledgement and one without, and the six variants are
   interleaved (in a rotating order) in one run, so that machine noise hits them alike. The
   server's resident memory is read once it has started.
2. Crowd: --clients concurrent clients submit to one server with a small model; every update must
   be accepted and the aggregate must equal FedAvg computed in memory (float64). Run with two
   model sizes, the server's peak resident memory is fitted as K x model size + C; K is reported
   (target: K < 3, i.e. peak under 3x model size plus a constant).

    python benchmarks/transport.py [--repeats 5] [--clients 100] [--widths 1024 1792] [--aggregation fedavg]

Writes benchmarks/results/transport.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

from _common import write_result
from gradguard.eval.models import resnet18
from gradguard.progress import progress_bar
from gradguard.transport import AggregatorClient, AggregatorConfig, generate_tokens
from gradguard.transport.codec import encode_tensors, write_tensors
from gradguard.update import ProtectedUpdate

MB = 2**20


# -- processes ------------------------------------------------------------------------------------
def start_server(workdir: Path, state: dict[str, torch.Tensor], tokens: dict[str, str],
                 min_clients: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """`gradguard serve` on a free loopback port, with its own state directory."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_tensors(workdir / "model.safetensors", state)
    (workdir / "clients.json").write_text(json.dumps(tokens))
    (workdir / "clients.json").chmod(0o600)  # the server refuses a tokens file others can read
    process = subprocess.Popen(
        [sys.executable, "-m", "gradguard.cli", "serve", "--state-dir", str(workdir / "state"),
         "--clients", str(workdir / "clients.json"), "--model", str(workdir / "model.safetensors"),
         "--address", "127.0.0.1:0", "--min-clients", str(min_clients), "--round-deadline", "0",
         "--log-level", "WARNING", *extra],
        stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"gradguard serve did not start: {line!r}")
    return process, line.split()[-1]


# How the baseline's receiver keeps the bytes: in memory, written to a file, or written and fsynced.
TCP_MEMORY, TCP_FILE, TCP_FSYNC = range(3)


def tcp_sink(folder: Path) -> None:
    """The baseline's receiver: for each connection, read a length, a mode and that many bytes,
    keep them as the mode says (a file in ``folder``, on the servers' disk), then ack. A file is
    written as the bytes arrive, as the aggregator writes an update. Bytes kept in memory go to
    one buffer, reused: a fresh one would cost a page fault per 4 KiB (some 30 ms for 45 MB
    here, more than the transfer), which no receiver that keeps updates in memory pays twice."""
    memory = bytearray()
    with socket.create_server(("127.0.0.1", 0)) as server:
        print(server.getsockname()[1], flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                size, mode = struct.unpack("<QB", conn.recv(9, socket.MSG_WAITALL))
                if mode == TCP_MEMORY:
                    if len(memory) < size:
                        memory = bytearray(size)
                    receive_into_memory(conn, memoryview(memory)[:size])
                else:
                    receive_into_file(conn, size, folder / "tcp-sink.bin", fsync=mode == TCP_FSYNC)
                conn.sendall(b"k")


def receive_into_memory(conn: socket.socket, view: memoryview) -> None:
    received = 0
    while received < len(view):
        received += conn.recv_into(view[received:])


def receive_into_file(conn: socket.socket, size: int, path: Path, *, fsync: bool) -> None:
    block, received = memoryview(bytearray(MB)), 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while received < size:
            count = conn.recv_into(block, min(MB, size - received))
            os.write(fd, block[:count])
            received += count
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()


def tcp_send(port: int, payload: bytes, mode: int) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(struct.pack("<QB", len(payload), mode))
        conn.sendall(payload)
        assert conn.recv(1) == b"k"
    return time.perf_counter() - start


def disk_write(folder: Path, payload: bytes) -> float:
    """Write ``payload`` to a new file and fsync it: what a durable acknowledgement cannot beat."""
    path = folder / "disk-probe.bin"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    """Restart a process's VmHWM from its current RSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# -- 1. throughput --------------------------------------------------------------------------------
def measure_throughput(repeats: int, workdir: Path, aggregation: str) -> dict[str, float]:
    state = resnet18(in_channels=3, num_classes=10).state_dict()
    delta = crowd_deltas(state, 1)[0]
    payload = encode_tensors(delta)
    tokens = generate_tokens(["bench"])
    servers = {fsync: start_server(workdir / f"fsync-{fsync}", state, tokens, 1, "--aggregation", aggregation,
                                   *([] if fsync else ["--no-fsync"])) for fsync in (True, False)}
    time.sleep(1.0)
    idle_rss = memory_kb(servers[True][0].pid)["VmRSS"] * 1024
    sink = subprocess.Popen([sys.executable, __file__, "--tcp-sink", str(workdir)], stdout=subprocess.PIPE, text=True)
    port = int(sink.stdout.readline())
    times: dict[str, list[float]] = {name: [] for name in ("fsync", "no_fsync", "tcp", "tcp_no_fsync", "tcp_memory",
                                                           "disk", "fetch")}
    clients = {fsync: AggregatorClient(address, client_id="bench", token=tokens["bench"])
               for fsync, (_, address) in servers.items()}

    def submit(fsync: bool, round_index: int) -> float:
        client = clients[fsync]
        update = ProtectedUpdate(tensors=delta, kind="delta", num_samples=1, num_steps=1, round=round_index)
        start = time.perf_counter()
        client.submit(update)
        elapsed = time.perf_counter() - start
        client.wait_for_round(round_index + 1, timeout_s=120, poll_s=0.02)
        return elapsed

    variants = {"fsync": lambda r: submit(True, r), "no_fsync": lambda r: submit(False, r),
                "tcp": lambda r: tcp_send(port, payload, TCP_FSYNC),
                "tcp_no_fsync": lambda r: tcp_send(port, payload, TCP_FILE),
                "tcp_memory": lambda r: tcp_send(port, payload, TCP_MEMORY),
                "disk": lambda r: disk_write(workdir, payload)}
    try:
        tcp_send(port, payload, TCP_FSYNC)  # warm the baseline once; round 0 warms the servers
        for round_index in progress_bar(range(repeats + 1), desc="45 MB update", unit="round"):
            names = list(variants)
            names = names[round_index % len(names):] + names[:round_index % len(names)]
            measured = {name: variants[name](round_index) for name in names}
            start = time.perf_counter()
            clients[True].fetch_global()
            measured["fetch"] = time.perf_counter() - start
            if round_index > 0:
                for name, seconds in measured.items():
                    times[name].append(seconds)
    finally:
        for client in clients.values():
            client.close()
        for process in (*(server for server, _ in servers.values()), sink):
            process.kill()
            process.wait()
    size = len(payload)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "update_bytes": size,
        "grpc_submit_s": median["fsync"],
        "tcp_send_s": median["tcp"],
        "grpc_submit_mb_s": size / MB / median["fsync"],
        "tcp_mb_s": size / MB / median["tcp"],
        "grpc_fetch_mb_s": size / MB / median["fetch"],
        "throughput_ratio_vs_tcp": median["tcp"] / median["fsync"],
        "throughput_ratio_vs_tcp_without_fsync": median["tcp_no_fsync"] / median["no_fsync"],
        "tcp_send_s_without_fsync": median["tcp_no_fsync"],
        "tcp_send_s_into_memory": median["tcp_memory"],
        "throughput_ratio_vs_tcp_into_memory": median["tcp_memory"] / median["fsync"],
        "throughput_ratio_vs_tcp_into_memory_without_fsync": median["tcp_memory"] / median["no_fsync"],
        "grpc_submit_mb_s_without_fsync": size / MB / median["no_fsync"],
        "server_start_rss_bytes": idle_rss,
        "disk_write_fsync_s": median["disk"],
        "throughput_ratio_vs_tcp_disk_bound": min(1.0, median["tcp"] / median["disk"]),
    }


# -- 2. many clients ------------------------------------------------------------------------------
def small_state(width: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width),
                          nn.Linear(width, 10))
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def crowd_deltas(state: dict[str, torch.Tensor], clients: int) -> list[dict[str, torch.Tensor]]:
    """A distinct update for every client, all views of one random pool (client i's starts i
    elements in), so that many clients cost the benchmark the memory of about one model."""
    names = [name for name, t in state.items() if t.is_floating_point()]
    pool = torch.randn(sum(state[n].numel() for n in names) + clients, generator=torch.Generator().manual_seed(0))
    pool *= 1e-3
    deltas = []
    for i in range(clients):
        delta, cursor = {}, i
        for name in names:
            delta[name] = pool[cursor:cursor + state[name].numel()].view(state[name].shape)
            cursor += state[name].numel()
        deltas.append(delta)
    return deltas


def crowd_round(clients: int, state: dict[str, torch.Tensor], workdir: Path, aggregation: str) -> dict[str, object]:
    """Every client submits in round 0 (which warms the server's code paths and connections up)
    and again in round 1, which is measured: all at once, from a common start line. Returns the
    server's RSS before round 1 and its peak during it, the acks, and the aggregate's error
    against FedAvg computed in memory (float64)."""
    weights = [1 + i % 7 for i in range(clients)]
    deltas = crowd_deltas(state, clients)
    mean = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in deltas[0].items()}
    for delta, weight in zip(deltas, weights):
        for name, value in delta.items():
            mean[name] += value.double() * (weight / sum(weights))
    reference = {name: state[name].double() + 2 * value for name, value in mean.items()}  # two rounds

    tokens = generate_tokens([f"client{i:03d}" for i in range(clients)])
    server, address = start_server(workdir, state, tokens, clients, "--aggregation", aggregation)
    acks, errors = [], []
    start_lines = [threading.Barrier(clients + 1) for _ in range(2)]

    def run(i: int) -> None:
        client_id = f"client{i:03d}"
        delta = deltas[i]
        with AggregatorClient(address, client_id=client_id, token=tokens[client_id]) as client:
            client.join()
            try:
                for round_index, start_line in enumerate(start_lines):
                    start_line.wait()
                    update = ProtectedUpdate(tensors=delta, kind="delta", num_samples=weights[i], num_steps=1,
                                             round=round_index)
                    ack = client.submit(update)
                    client.wait_for_round(round_index + 1, timeout_s=300)
                acks.append(ack)
            except Exception as err:  # reported below
                errors.append(f"{client_id}: {err}")
                for start_line in start_lines:
                    start_line.abort()

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        start_lines[0].wait()
        while start_lines[1].n_waiting < clients:  # round 0 is over for every client
            if errors:  # a client failed: the barrier is broken and the run reports it
                raise RuntimeError(f"{len(errors)} client(s) failed in round 0, e.g. {errors[0]}")
            time.sleep(0.05)
        time.sleep(0.5)
        idle = memory_kb(server.pid)["VmRSS"] * 1024
        reset_peak(server.pid)
        start_lines[1].wait()
        for thread in progress_bar(threads, desc=f"{clients} clients", unit="client"):
            thread.join()
        peak = memory_kb(server.pid)["VmHWM"] * 1024
        with AggregatorClient(address, client_id="client000", token=tokens["client000"]) as client:
            _, aggregate = client.fetch_global(round=2)
    finally:
        server.kill()
        server.wait()
    error = max(float((aggregate[name].double() - want).abs().max()) for name, want in reference.items())
    return {"idle": idle, "peak": peak, "accepted": sum(1 for ack in acks if not ack.duplicate),
            "errors": errors, "error": error}


def measure_crowd(clients: int, widths: tuple[int, int], workdir: Path, aggregation: str) -> dict[str, object]:
    """The crowd with two model sizes. The server's peak RSS is fitted as K x model size + C:
    K (the slope between the two runs) is the memory the server needs per byte of model, C what it
    needs whatever the model (interpreter, libraries, connections, threads, chunk buffers)."""
    states = [small_state(width) for width in widths]
    sizes = [sum(t.numel() * t.element_size() for t in state.values()) for state in states]
    runs = [crowd_round(clients, state, workdir / f"width{width}", aggregation) for state, width in zip(states, widths)]
    slope = (runs[1]["peak"] - runs[0]["peak"]) / (sizes[1] - sizes[0])
    errors = [e for run in runs for e in run["errors"]]
    return {
        "clients": clients,
        "clients_accepted": min(run["accepted"] for run in runs),
        "client_errors": errors[:5],
        "aggregate_max_abs_error": max(run["error"] for run in runs),
        "aggregate_correct": max(run["error"] for run in runs) <= 1e-6 and not errors,
        "model_bytes": sizes,
        "server_idle_rss_bytes": [run["idle"] for run in runs],
        "server_peak_rss_bytes": [run["peak"] for run in runs],
        "peak_rss_constant_bytes": runs[0]["peak"] - slope * sizes[0],
        "peak_rss_over_model_size": slope,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--widths", type=int, nargs=2, default=(1024, 1792),
                        help="hidden widths of the crowd's two small models (about 8 MB and 26 MB)")
    parser.add_argument("--aggregation", default="fedavg", choices=("fedavg", "median", "trimmed_mean"),
                        help="the servers' rule (the crowd's reference is FedAvg, so its check needs fedavg)")
    parser.add_argument("--tcp-sink", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tcp_sink:
        return tcp_sink(args.tcp_sink)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        load_before = os.getloadavg()
        throughput = measure_throughput(args.repeats, Path(workdir) / "throughput", args.aggregation)
        # The ratios are only comparable within a run: record how busy the machine was.
        throughput["load_average_during_throughput"] = [round(x, 2) for x in (*load_before, *os.getloadavg())]
        crowd = measure_crowd(args.clients, tuple(args.widths), Path(workdir) / "crowd", args.aggregation)
    figures = {
        "throughput_ratio_vs_tcp": round(throughput.pop("throughput_ratio_vs_tcp"), 3),
        "clients": crowd.pop("clients"),
        "clients_accepted": crowd.pop("clients_accepted"),
        "peak_rss_over_model_size": round(crowd.pop("peak_rss_over_model_size"), 3),
        "aggregation": args.aggregation,
        **throughput, **crowd,
    }
    defaults = AggregatorConfig()
    write_result("transport", figures, {
        "repeats": args.repeats, "widths": list(args.widths), "chunk_bytes": defaults.chunk_bytes,
        "max_workers": defaults.max_workers, "control_workers": defaults.control_workers,
        "max_concurrent_updates": defaults.max_concurrent_updates, "fsync": defaults.fsync,
        "aggregation": args.aggregation, "clients": args.clients, "cpus": os.cpu_count(),
        "targets": {"throughput_ratio_vs_tcp": ">= 0.8", "peak_rss_over_model_size": "< 3",
                    "server_idle_rss_bytes": "< 150 MB"},
        "definitions": {
            "throughput_ratio_vs_tcp": "median TCP send time (the receiver writes the bytes to a file and fsyncs "
                                       "it before its ack) / median AggregatorClient.submit time (encode, stream "
                                       "while hashing, server checks, fsync, ack) of the same bytes",
            "throughput_ratio_vs_tcp_without_fsync": "the same without fsync, on either side",
            "throughput_ratio_vs_tcp_into_memory": "median time of a TCP send whose receiver keeps the bytes in "
                                                   "memory (one buffer, reused) / median AggregatorClient.submit "
                                                   "time (with fsync)",
            "throughput_ratio_vs_tcp_disk_bound": "the best ratio a durable ack allows on this disk: median TCP "
                                                  "send time / median time to write and fsync the same bytes "
                                                  "(at most 1)",
            "load_average_during_throughput": "the 1, 5 and 15 minute load averages before, then after, the "
                                              "throughput measurement",
            "server_idle_rss_bytes": "the server's RSS with every client connected, before the measured round",
            "server_start_rss_bytes": "the RSS of a server holding the ResNet-18 model, just started",
            "peak_rss_over_model_size": "K in: server peak RSS during a round of all clients = K x model bytes "
                                        "+ C, fitted from two model sizes",
        },
    })
    print(json.dumps({k: figures[k] for k in ("throughput_ratio_vs_tcp", "throughput_ratio_vs_tcp_without_fsync",
                                              "clients", "clients_accepted", "peak_rss_over_model_size",
                                              "aggregate_correct", "server_idle_rss_bytes",
                                              "server_start_rss_bytes")}))


if __name__ == "__main__":
    main()
