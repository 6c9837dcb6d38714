"""The aggregator's state directory: every write is atomic, so a SIGKILL never leaves it torn.

Layout::

    state.json                        round, deadline clock, joined clients, accepted updates
    global-000007.safetensors         the global model of the open round
    updates/round-000007/<id>.safetensors   every update accepted in the open round
    incoming/                         payloads still being received (discarded on restart)

``state.json`` is the single source of truth: a file is written under a temporary name, flushed,
and renamed into place, and only then does ``state.json`` (itself replaced atomically) mention
it. An update is acknowledged after ``state.json`` lists it, so every acknowledged update is
replayed on restart; files that ``state.json`` does not mention are leftovers and are removed.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from gradguard.transport.codec import write_tensors

_FORMAT = 1
_T = TypeVar("_T")


@dataclass(frozen=True)
class AcceptedUpdate:
    """What the aggregator keeps about an accepted update besides its tensors."""

    sha256: str
    num_samples: int
    num_steps: int
    nbytes: int


@dataclass
class RoundState:
    round: int
    opened_at: float  # unix time; the round's deadline counts from here, across restarts
    global_file: str
    global_sha256: str
    joined: list[str] = field(default_factory=list)
    accepted: dict[str, AcceptedUpdate] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": _FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> "RoundState":
        if data.get("format") != _FORMAT:
            raise ValueError(f"state format {data.get('format')!r} is not {_FORMAT}: this state directory "
                             "was written by another gradguard version")
        fields = {k: v for k, v in data.items() if k != "format"}
        fields["accepted"] = {cid: AcceptedUpdate(**rec) for cid, rec in fields["accepted"].items()}
        return cls(**fields)


class StateStore:
    """Atomic reads and writes of one aggregator's state directory."""

    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._incoming = self.root / "incoming"
        self._updates = self.root / "updates"
        for folder in (self.root, self._incoming, self._updates):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def _state_file(self) -> Path:
        return self.root / "state.json"

    def exists(self) -> bool:
        return self._state_file.exists()

    def load(self) -> RoundState:
        try:
            return RoundState.from_json(json.loads(self._state_file.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{self._state_file} is unreadable ({err}); restore it or start from an empty "
                             "state directory") from err

    def save(self, state: RoundState) -> None:
        payload = json.dumps(state.to_json(), indent=1).encode()
        self._atomic_write(self._state_file, lambda tmp: tmp.write_bytes(payload))

    def global_path(self, state: RoundState) -> Path:
        return self.root / state.global_file

    def write_global(self, round_index: int, tensors: Mapping[str, torch.Tensor]) -> tuple[str, str]:
        """Write the global model of ``round_index``; returns (file name, sha256)."""
        path = self.root / f"global-{round_index:06d}.safetensors"
        return path.name, self._atomic_write(path, lambda tmp: write_tensors(tmp, tensors))

    def update_path(self, round_index: int, client_id: str) -> Path:
        return self._updates / f"round-{round_index:06d}" / f"{client_id}.safetensors"

    def incoming_path(self) -> Path:
        """A fresh path to receive a payload into; the caller removes it when done."""
        return self._incoming / f"{uuid.uuid4().hex}.part"

    def commit_update(self, received: Path, round_index: int, client_id: str) -> None:
        """Move a received and checked payload to its place among the round's updates."""
        target = self.update_path(round_index, client_id)
        target.parent.mkdir(exist_ok=True)
        if self.fsync:
            _fsync(received)
        os.replace(received, target)
        if self.fsync:
            _fsync(target.parent)

    def prune(self, state: RoundState) -> None:
        """Remove everything ``state`` does not refer to: old globals, old rounds, partial payloads."""
        for path in self.root.glob("global-*.safetensors"):
            if path.name != state.global_file:
                path.unlink(missing_ok=True)
        current = self.update_path(state.round, "_").parent
        for folder in self._updates.iterdir():
            if folder != current:
                shutil.rmtree(folder, ignore_errors=True)
        if current.exists():
            for path in current.iterdir():
                if path.stem not in state.accepted:
                    path.unlink(missing_ok=True)
        for path in self._incoming.iterdir():
            path.unlink(missing_ok=True)
        for path in self.root.glob(".*.tmp"):
            path.unlink(missing_ok=True)

    def _atomic_write(self, path: Path, write: Callable[[Path], _T]) -> _T:
        """Run ``write`` on a temporary file, then move it to ``path``; returns what ``write`` returned."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            result = write(tmp)
            if self.fsync:
                _fsync(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if self.fsync:
            _fsync(path.parent)
        return result


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
