"""Run the example on one machine: Flower's deployment engine on loopback, then clean up.

Starts one SuperLink and ``--nodes`` SuperNodes (plaintext on 127.0.0.1 only, free ports, state
and logs under ``--workdir``), submits this Flower App with ``flwr run``, waits for the run to
finish, and stops every process it started. These are the processes of a real multi-machine
federation (see README.md for TLS and SuperNode authentication), so each ClientApp message runs
in a fresh process exactly as it would on a hospital's node.

    python examples/flower/run_local.py --out-dir out/flower
    python examples/flower/run_local.py --run-config "num-server-rounds=5 gradguard.noise-amplitude=0.2"
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

APP_DIR = Path(__file__).resolve().parent
CONNECTION = "gradguard-local"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalFederation:
    """A SuperLink and ``nodes`` SuperNodes on loopback, for the duration of a ``with`` block.

    SuperNode i gets ``--node-config "partition-id=i num-partitions=<nodes>"``, plus
    ``gradguard-seed=<node_seed>`` when given (reproducible noise; otherwise each node draws a
    secret seed). Every process runs in its own session, so stopping it also stops the SuperExec
    and app processes it spawned.
    """

    def __init__(self, nodes: int, workdir: Path, *, node_seed: int | None = None,
                 startup_timeout_s: float = 60.0) -> None:
        if nodes < 1:
            raise ValueError(f"a federation needs at least one SuperNode, got {nodes}")
        self.nodes, self.workdir, self.startup_timeout_s = nodes, workdir, startup_timeout_s
        self.node_seed = node_seed
        self.port = _free_port()
        self.env = dict(os.environ, FLWR_HOME=str(workdir / "flwr-home"))
        # SuperNodes start `flwr-clientapp` and friends by name: they must be this Python's.
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        # The example's clients share one machine; one thread each keeps them from fighting over the cores.
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self._processes: list[tuple[str, subprocess.Popen]] = []

    def _start(self, name: str, command: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self._processes.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                       start_new_session=True)))
        log.close()

    def _wait_for_superlink(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._processes[0][1].poll() is not None:
                raise RuntimeError(f"flower-superlink exited at start-up; see {self.workdir / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"flower-superlink did not answer within {self.startup_timeout_s} s; "
                           f"see {self.workdir / 'superlink.log'}")

    def __enter__(self) -> "LocalFederation":
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        try:
            # The app runs in this Python environment: no `uv sync` of its dependencies per run.
            self._start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--database", str(self.workdir / "superlink.db"),
                                      "--disable-runtime-dependency-installation"])
            self._wait_for_superlink()
            seed = "" if self.node_seed is None else f" gradguard-seed={self.node_seed}"
            for i in range(self.nodes):
                self._start(f"supernode-{i}", [
                    "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                    "--host", "127.0.0.1", "--port", str(_free_port()),
                    "--node-config", f"partition-id={i} num-partitions={self.nodes}{seed}"])
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process group started here (SuperNodes first), SIGKILL what is left."""
        for _, process in reversed(self._processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # also the group's children that outlived their parent
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        self._processes.clear()

    def run(self, app_dir: Path, run_config: str = "", *, timeout_s: float = 1800.0) -> dict:
        """``flwr run`` the app, streaming its logs to stdout; returns the run's record from
        ``flwr ls`` and raises if the run did not complete."""
        command = ["flwr", "run", str(app_dir), CONNECTION, "--stream"]
        if run_config:
            command += ["--run-config", run_config]
        subprocess.run(command, env=self.env, check=True, timeout=timeout_s)
        listing = subprocess.run(["flwr", "ls", CONNECTION, "--format", "json"], env=self.env, check=True,
                                 capture_output=True, text=True, timeout=60)
        runs = json.loads(listing.stdout)["runs"]
        record = max(runs, key=lambda r: r["pending-at"])
        if record["status"] != "finished:completed":
            raise RuntimeError(f"run {record['run-id']} ended as {record['status']!r}; logs: "
                               f"{', '.join(str(p) for p in sorted(self.workdir.glob('*.log')))}")
        return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes to start (default 3)")
    parser.add_argument("--out-dir", type=Path, help="save every round's global model here")
    parser.add_argument("--run-config", default="", help='more overrides, e.g. "num-server-rounds=5"')
    parser.add_argument("--node-seed", type=int, help="fix the SuperNodes' noise seed (reproducible runs; "
                        "by default each node draws a secret one)")
    parser.add_argument("--workdir", type=Path, help="state and logs (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take")
    args = parser.parse_args(argv)
    overrides = [f"min-nodes={args.nodes}"]
    if args.out_dir is not None:
        overrides.append(f"out-dir={json.dumps(str(args.out_dir.resolve()))}")
    if args.run_config:
        overrides.append(args.run_config)
    with tempfile.TemporaryDirectory(prefix="gradguard-flower-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        with LocalFederation(args.nodes, workdir, node_seed=args.node_seed) as federation:
            record = federation.run(APP_DIR, " ".join(overrides), timeout_s=args.timeout)
    print(f"run {record['run-id']}: {record['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
