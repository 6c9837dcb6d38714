"""`gradguard serve` (the aggregator) and `gradguard client` (its client, for scripts and checks).

Secrets never go on the command line, where other users could read them: the server reads the
tokens from a JSON file, a client reads its token from a file or $GRADGUARD_TOKEN; both files
must be private to their user (chmod 600). `gradguard serve` imports no torch.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gradguard.transport.aggregation import RULES
from gradguard.transport.auth import ClientTLS, ServerTLS, check_private_file
from gradguard.transport.config import AggregatorConfig
from gradguard.transport.errors import TransportError

TOKEN_ENV = "GRADGUARD_TOKEN"
_MMAP_BYTES = 4 << 20  # above the largest message a server accepts (wire.MAX_MESSAGE_BYTES)
_TRIM_BYTES = 16 << 20  # a few chunks of each of the uploads received at once


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the aggregator (FedAvg over gRPC)",
                                  description=_serve.__doc__)
    serve.add_argument("--state-dir", type=Path, required=True,
                       help="where the global model, round state and accepted updates are kept; an existing "
                            "state is resumed")
    serve.add_argument("--clients", type=Path, required=True,
                       help='private (chmod 600) JSON file {"client_id": "token", ...}, or {"client_id": '
                            '{"token": "...", "max_num_samples": 500}, ...} (tokens: python -c "import secrets; '
                            'print(secrets.token_urlsafe(32))")')
    serve.add_argument("--model", type=Path,
                       help="safetensors file with the initial global state dict (needed for a new state dir)")
    serve.add_argument("--address", default="127.0.0.1:50051", help="host:port to listen on (port 0: any free)")
    defaults = AggregatorConfig()
    serve.add_argument("--min-clients", type=int, default=defaults.min_clients)
    serve.add_argument("--round-deadline", type=float, default=defaults.round_deadline_s,
                       help="seconds after which a round closes without the missing clients (0: no deadline)")
    serve.add_argument("--max-update-mb", type=float, default=defaults.max_update_bytes / 2**20)
    serve.add_argument("--aggregation", choices=RULES, default=defaults.aggregation,
                       help="fedavg (weighted by num_samples), or a robust rule where each client has one vote: "
                            "coordinate-wise median or trimmed_mean (see --trim-fraction)")
    serve.add_argument("--trim-fraction", type=float, default=defaults.trim_fraction,
                       help="share of values dropped at each end of every coordinate by trimmed_mean")
    serve.add_argument("--max-update-norm", type=float,
                       help="bound on an update's L2 norm (default: none); see --norm-bound")
    serve.add_argument("--norm-bound", choices=("clip", "refuse"), default=defaults.norm_bound,
                       help="beyond --max-update-norm, scale the update down to it or refuse it")
    serve.add_argument("--max-leakage-db", type=float,
                       help="refuse an update whose own leakage report estimates more than this many dB above the "
                            "attacker's prior, says it missed its target, or is missing (default: no maximum)")
    serve.add_argument("--max-num-samples", type=int, default=defaults.max_num_samples,
                       help="largest num_samples (FedAvg weight) accepted; clients.json can lower it per client")
    serve.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout_s,
                       help="seconds an upload or fetch may move no data before the server cuts it")
    serve.add_argument("--rounds", type=int,
                       help="run this many rounds, then refuse updates and keep serving the final global model")
    serve.add_argument("--linger", type=float,
                       help="with --rounds: exit this many seconds after the last round (default: serve the final "
                            "model until stopped)")
    serve.add_argument("--no-fsync", action="store_true",
                       help="acknowledge updates before they reach the disk: faster, and they still survive "
                            "a crash of the server, but not of the machine")
    serve.add_argument("--tls-cert", type=Path, help="the server's PEM certificate chain")
    serve.add_argument("--tls-key", type=Path, help="the server's PEM private key")
    serve.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)")
    serve.add_argument("--allow-insecure", action="store_true",
                       help="allow plaintext on a non-loopback address (only inside a network you trust)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=_serve)

    client = subparsers.add_parser("client", help="talk to an aggregator: join, status, fetch, submit, wait",
                                   description=__doc__.splitlines()[0])
    client.add_argument("--address", default="127.0.0.1:50051")
    client.add_argument("--client-id", required=True)
    client.add_argument("--token-file", type=Path, help=f"file holding the token (default: ${TOKEN_ENV})")
    client.add_argument("--tls-ca", type=Path, help="CA that signed the server's certificate (enables TLS)")
    client.add_argument("--tls-cert", type=Path, help="this client's certificate, for mutual TLS")
    client.add_argument("--tls-key", type=Path, help="this client's private key, for mutual TLS")
    client.add_argument("--server-name", help="name to check the server's certificate against")
    actions = client.add_subparsers(dest="action", required=True)
    actions.add_parser("join", help="register with the federation")
    actions.add_parser("status", help="the open round and its progress")
    fetch = actions.add_parser("fetch", help="download the global model as safetensors")
    fetch.add_argument("--out", type=Path, required=True)
    fetch.add_argument("--round", type=int)
    submit = actions.add_parser("submit", help="send an update written by gradguard.transport.codec.save_update")
    submit.add_argument("update", type=Path)
    wait = actions.add_parser("wait", help="block until a round is open")
    wait.add_argument("--round", type=int, required=True)
    wait.add_argument("--timeout", type=float, default=600.0, help="seconds to wait at most (default: 600)")
    client.set_defaults(func=_client)


def _read_clients(path: Path) -> Any:
    """The clients file, or a SystemExit that says what is wrong with it."""
    try:
        check_private_file(path, "the clients' tokens")
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"gradguard serve: {path} does not exist; write the clients' tokens there as JSON "
                         '{"client_id": "token"} and chmod 600 it') from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"gradguard serve: {path} is not JSON ({err})") from None
    except (ValueError, OSError) as err:
        raise SystemExit(f"gradguard serve: {err}") from None


def _tune_malloc(arenas: int = 2) -> None:
    """Tune glibc's malloc for this process. By default every thread that allocates gets its own
    arena, and the server's 16 threads each keep freed chunk buffers: measured with 100 clients,
    117 MB idle and 176 MB peak RSS with the default, 85 MB and 118 MB with 2 arenas. And by
    default the 1 MiB buffers gRPC hands each received chunk in are mapped afresh (or their heap
    trimmed and grown again) every few chunks: each new page then costs a fault, about 3 us here,
    some 1000 per 45 MB update, in the thread that delivers the chunks. Serving buffers below
    ``_MMAP_BYTES`` from the heap, and keeping up to ``_TRIM_BYTES`` of it free, reuses them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
        libc.mallopt(-3, _MMAP_BYTES)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, _TRIM_BYTES)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _serve(args: argparse.Namespace) -> int:
    """Run the aggregator until SIGINT/SIGTERM (after --rounds, for --linger seconds more if given).
    Prints its address on stdout."""
    from gradguard.transport.server import AggregatorServer

    _tune_malloc()  # before any thread starts
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    clients = _read_clients(args.clients)
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("gradguard serve: TLS needs both --tls-cert and --tls-key")
        tls = ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca)
    try:
        config = AggregatorConfig(
            min_clients=args.min_clients, round_deadline_s=args.round_deadline or None, rounds=args.rounds,
            aggregation=args.aggregation, trim_fraction=args.trim_fraction, max_update_norm=args.max_update_norm,
            norm_bound=args.norm_bound, max_leakage_db=args.max_leakage_db, max_num_samples=args.max_num_samples,
            max_update_bytes=int(args.max_update_mb * 2**20), idle_timeout_s=args.idle_timeout,
            fsync=not args.no_fsync)
        # The model is passed as its file: the server copies it into the state directory and
        # never holds it in memory.
        server = AggregatorServer(args.model, state_dir=args.state_dir, clients=clients, config=config, tls=tls,
                                  address=args.address, allow_insecure=args.allow_insecure)
    except ValueError as err:
        raise SystemExit(f"gradguard serve: {err}") from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(f"listening on {server.address}", flush=True)
    finished_at = None
    try:
        while not stop.wait(0.2):
            if finished_at is None and server.finished:
                finished_at = time.monotonic()
            if finished_at is not None and args.linger is not None and time.monotonic() - finished_at >= args.linger:
                break
    finally:
        server.stop()
    return 0


def _client(args: argparse.Namespace) -> int:
    """One call to the aggregator; prints its result as JSON."""
    from gradguard.transport.client import AggregatorClient

    token = None
    if args.token_file:
        try:
            check_private_file(args.token_file, "this client's token")
            token = args.token_file.read_text().strip()
        except (ValueError, OSError) as err:
            raise SystemExit(f"gradguard client: {err}") from None
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise SystemExit(f"gradguard client: give the token with --token-file or ${TOKEN_ENV}")
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key, args.server_name)
    with AggregatorClient(args.address, client_id=args.client_id, token=token, tls=tls) as client:
        try:
            result = _client_action(client, args)
        except (TransportError, TimeoutError) as err:
            print(f"gradguard client {args.action}: {err}", file=sys.stderr)
            return 1
    # JSON has no Infinity: an absent deadline is null.
    json.dump({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()},
              sys.stdout, allow_nan=False)
    print()
    return 0


def _client_action(client: Any, args: argparse.Namespace) -> dict:
    from gradguard.transport.codec import load_update, write_tensors

    if args.action == "join":
        info = client.join()
        return {"round": info.round, "tensors": len(info.layout), "min_clients": info.min_clients}
    if args.action == "status":
        return dataclasses.asdict(client.status())
    if args.action == "fetch":
        round_index, state = client.fetch_global(args.round)
        write_tensors(args.out, state)
        return {"round": round_index, "out": str(args.out), "tensors": len(state)}
    if args.action == "submit":
        return dataclasses.asdict(client.submit(load_update(args.update)))
    return dataclasses.asdict(client.wait_for_round(args.round, args.timeout))
