"""What every benchmark shares: the machine's description, percentiles, the printed table and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def cpu_model() -> str:
    """The processor's name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine a figure was measured on: OS, CPU, usable cores, torch and its threads, the GPU if any."""
    import torch

    return {"platform": platform.platform(), "cpu": cpu_model(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / mean in milliseconds of durations given in seconds."""
    array = np.asarray(values, dtype=float) * 1000.0
    return {"p50_ms": float(np.percentile(array, 50)), "p99_ms": float(np.percentile(array, 99)),
            "mean_ms": float(array.mean()), "n": len(array)}


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces a result."""
    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def print_table(rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """Write `result` as JSON (atomically: a half-written file never replaces a whole one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(path.suffix + ".tmp")
    staging.write_text(json.dumps(result, indent=2) + "\n")
    staging.replace(path)
    return path
