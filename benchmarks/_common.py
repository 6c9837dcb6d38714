"""Shared by the benchmark scripts: where results go and how they are recorded."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, figures: dict[str, Any], settings: dict[str, Any]) -> Path:
    """Write figures with the command and settings that produced them to results/NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        **figures,
        "settings": settings,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")
    return path
