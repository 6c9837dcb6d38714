"""The one way GradGuard shows progress: tqdm bars that stay quiet where nobody watches them."""
from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(*args: Any, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(*args, **kwargs)``, off when ``enabled`` is False and also when its stream (stderr) is
    not a terminal: tqdm's ``disable=None``. A bar redrawn into a log file or a pipe leaves one line
    per refresh, tens of kilobytes of noise in a benchmark's or a demo's log."""
    return tqdm(*args, disable=None if enabled else True, **kwargs)
