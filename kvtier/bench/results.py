"""Where benchmarks write, and how: JSON plus a short markdown table."""

from __future__ import annotations

import json
import os
import pathlib
import platform
from typing import Dict, List, Optional, Sequence

import torch

from ..config import env


def results_dir(override: Optional[str] = None) -> pathlib.Path:
    """`override`, else $KVTIER_RESULTS_DIR, else benchmarks/results (created)."""
    path = pathlib.Path(override or env.get(env.RESULTS_DIR) or "benchmarks/results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> Dict[str, object]:
    info: Dict[str, object] = {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
                               "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown_table(rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(name: str, payload: Dict[str, object], table: str) -> pathlib.Path:
    out = results_dir()
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(table)
    return out / f"{name}.json"
