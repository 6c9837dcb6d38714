"""The aggregator's state directory: every write is atomic, so a SIGKILL never leaves it torn.

Layout (directories 0700, files 0600: updates are private to the server's user)::

    state.json                        round, deadline clock, joined clients, accepted updates
    global-000007.safetensors         the global model of the open round
    updates/round-000007/<id>.safetensors   every update accepted in the open round
    incoming/                         payloads still being received (discarded on restart)

``state.json`` is the single source of truth: a file is written under a temporary name, flushed,
and renamed into place, and only then does ``state.json`` (itself replaced atomically) mention
it. An update is acknowledged after ``state.json`` lists it, so every acknowledged update is
replayed on restart; files that ``state.json`` does not mention are leftovers and are removed.
A directory that holds rounds but no ``state.json`` is never cleaned: the server refuses it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gradguard.transport.wire import HashingWriter

log = logging.getLogger(__name__)

_FORMAT = 3  # 3: BLAKE3 digests (2, gradguard 0.1: SHA-256)
_PRIVATE_DIR, _PRIVATE_FILE = 0o700, 0o600


@dataclass(frozen=True)
class AcceptedUpdate:
    """What the aggregator keeps about an accepted update besides its tensors."""

    digest: str
    num_samples: int
    num_steps: int
    nbytes: int
    header_digest: str  # digest of the whole UpdateHeader: a retry must match it, not only the bytes
    norm: float  # the update's L2 norm (0 when no norm bound was in force)


@dataclass(frozen=True)
class PastUpdate:
    """A client's last update of a closed round, so that a late retry of it is recognised."""

    round: int
    digest: str
    header_digest: str
    accepted_in_round: int


@dataclass
class RoundState:
    round: int
    opened_at: float  # unix time; the round's deadline counts from here, across restarts
    global_file: str
    global_digest: str
    joined: list[str] = field(default_factory=list)
    accepted: dict[str, AcceptedUpdate] = field(default_factory=dict)
    past: dict[str, PastUpdate] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": _FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> "RoundState":
        """Parse ``state.json``; raises ValueError naming the first field that is not as written."""
        _expect(data, dict, "the top level")
        if data.get("format") == 2:
            raise ValueError("state format 2 holds the SHA-256 digests of gradguard 0.1, which this version no longer "
                             "computes: finish its rounds with gradguard 0.1, or continue from its newest global model "
                             "in a new state directory (gradguard serve --state-dir NEW_DIR --model GLOBAL_FILE)")
        if data.get("format") != _FORMAT:
            raise ValueError(f"state format {str(data.get('format'))[:20]!r} is not {_FORMAT}: this state directory "
                             "was written by another gradguard version")
        _keys(data, {"format", *(f.name for f in fields(cls))}, "the top level")
        state = cls(
            round=_expect(data["round"], int, "round"), opened_at=float(_expect(data["opened_at"], (int, float),
                                                                                "opened_at")),
            global_file=_expect(data["global_file"], str, "global_file"),
            global_digest=_expect(data["global_digest"], str, "global_digest"),
            joined=[_expect(c, str, "joined[]") for c in _expect(data["joined"], list, "joined")],
            accepted={_expect(c, str, "accepted key"): _record(AcceptedUpdate, r, f"accepted[{c[:64]!r}]")
                      for c, r in _expect(data["accepted"], dict, "accepted").items()},
            past={_expect(c, str, "past key"): _record(PastUpdate, r, f"past[{c[:64]!r}]")
                  for c, r in _expect(data["past"], dict, "past").items()})
        if state.round < 0 or "/" in state.global_file or not state.global_file.startswith("global-"):
            raise ValueError("round or global_file has a value the server never writes")
        return state


def _expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or (kind in (int, (int, float)) and isinstance(value, bool)):
        raise ValueError(f"{what} is a {type(value).__name__}, not the {getattr(kind, '__name__', 'number')} "
                         "the server writes")
    return value


def _keys(data: dict, want: set[str], what: str) -> None:
    if set(data) != want:
        raise ValueError(f"{what} has fields {sorted(data)[:8]}, not {sorted(want)}")


def _record(cls: type, data: Any, what: str) -> Any:
    _expect(data, dict, what)
    _keys(data, {f.name for f in fields(cls)}, what)
    kinds: dict[str, type | tuple[type, ...]] = {"int": int, "str": str, "float": (int, float)}
    return cls(**{f.name: _expect(data[f.name], kinds[str(f.type)], f"{what}.{f.name}") for f in fields(cls)})


class StateStore:
    """Atomic reads and writes of one aggregator's state directory."""

    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._incoming = self.root / "incoming"
        self._updates = self.root / "updates"
        for folder in (self.root, self._incoming, self._updates):
            self._make_private_dir(folder)

    @property
    def _state_file(self) -> Path:
        return self.root / "state.json"

    def exists(self) -> bool:
        return self._state_file.exists()

    def check_no_orphaned_rounds(self) -> None:
        """Refuse a directory with a global model or updates but no ``state.json``: starting
        afresh there would delete them."""
        globals_ = sorted(self.root.glob("global-*.safetensors"))
        rounds = [p for p in self._updates.iterdir() if any(p.iterdir())] if self._updates.exists() else []
        if not globals_ and not rounds:
            return
        newest = globals_[-1] if globals_ else None
        resume = (f"gradguard serve --state-dir NEW_DIR --model {newest} ... continues from its newest global model "
                  "(rounds count again from 0); or " if newest else "")
        raise ValueError(
            f"{self.root} holds {len(globals_)} global model(s) and {len(rounds)} round(s) of updates but no "
            f"state.json, so the server refuses to start there (it would delete them). Restore "
            f"{self._state_file} from a backup; or {resume}move the directory away to start over: "
            f"mv {self.root} {self.root}.bak")

    def load(self) -> RoundState:
        try:
            return RoundState.from_json(json.loads(self._state_file.read_text()))
        except (ValueError, UnicodeDecodeError, RecursionError, OSError) as err:
            raise ValueError(f"{self._state_file} is unreadable ({str(err)[:300]}); restore it from a backup, or "
                             "start from an empty state directory") from None

    def save(self, state: RoundState) -> None:
        payload = json.dumps(state.to_json(), indent=1, allow_nan=False).encode()
        self.write_atomic(self._state_file, lambda writer: writer.write(payload))

    def global_path(self, state: RoundState) -> Path:
        return self.root / state.global_file

    def global_name(self, round_index: int) -> str:
        return f"global-{round_index:06d}.safetensors"

    def write_global(self, round_index: int, blocks: Iterable[bytes | memoryview]) -> tuple[str, str]:
        """Write the global model of ``round_index`` from its bytes; returns (file name, digest)."""
        def write(writer: HashingWriter) -> None:
            for block in blocks:
                writer.write(block)
        name = self.global_name(round_index)
        return name, self.write_atomic(self.root / name, write)

    def update_path(self, round_index: int, client_id: str) -> Path:
        return self._updates / f"round-{round_index:06d}" / f"{client_id}.safetensors"

    def incoming_path(self) -> Path:
        """A fresh path to receive a payload into; the caller removes it when done."""
        return self._incoming / f"{uuid.uuid4().hex}.part"

    def make_round_dir(self, round_index: int) -> None:
        """Create the folder of a round's updates (if missing)."""
        self._make_private_dir(self.update_path(round_index, "_").parent)

    def commit_update(self, received: Path, round_index: int, client_id: str) -> None:
        """Move a received, checked (and, with fsync, flushed) payload among the round's updates."""
        target = self.update_path(round_index, client_id)
        self.make_round_dir(round_index)
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

    def write_atomic(self, path: Path, write: Callable[[HashingWriter], None]) -> str:
        """Run ``write`` on a temporary file, then move it to ``path``; returns the file's BLAKE3 digest."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with HashingWriter(tmp) as writer:
                write(writer)
                if self.fsync:
                    writer.fsync()
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if self.fsync:
            _fsync(path.parent)
        return writer.hexdigest()

    def _make_private_dir(self, folder: Path) -> None:
        """Create ``folder`` (0700, its entry flushed in its parent) or tighten an existing one."""
        try:
            folder.mkdir(mode=_PRIVATE_DIR)
        except FileExistsError:
            mode = stat.S_IMODE(folder.stat().st_mode)
            if mode & 0o077:
                log.warning("%s was readable by other users (mode %o); it is now 0700", folder, mode)
                folder.chmod(_PRIVATE_DIR)
            return
        except FileNotFoundError:
            self._make_private_dir(folder.parent)
            folder.mkdir(mode=_PRIVATE_DIR)
        if self.fsync:
            _fsync(folder.parent)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
