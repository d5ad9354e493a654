"""Where benchmarks write, and how: JSON plus a short markdown table.

A run writes outside the checkout unless told otherwise: `--results-dir DIR`,
else $KVTIER_RESULTS_DIR, else ~/.cache/kvtier/results. The repository's
record, benchmarks/results/, is written on purpose
(`--results-dir benchmarks/results`), so running a README command leaves
`git status` clean.

Every JSON written here also records when it was made (`date`, UTC), the
command line that made it (`command`) and the kvtier commit it ran
(`commit`, null outside a git checkout), which the results index
(`python -m kvtier.bench.index`) lists.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from ..config import env


REPOSITORY_RESULTS = "benchmarks/results"  # the checkout's record: --results-dir benchmarks/results


def default_results_dir() -> pathlib.Path:
    return pathlib.Path.home() / ".cache" / "kvtier" / "results"


def results_dir(override: Optional[str] = None) -> pathlib.Path:
    """`override`, else $KVTIER_RESULTS_DIR, else ~/.cache/kvtier/results (created)."""
    path = pathlib.Path(override or env.get(env.RESULTS_DIR) or default_results_dir()).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def add_results_dir_argument(parser, *aliases: str) -> None:
    """The --results-dir option every writing benchmark takes."""
    parser.add_argument("--results-dir", *aliases, dest="results_dir", default=None, metavar="DIR",
                        help=f"where the JSON and tables go (default: ${env.RESULTS_DIR.name}, else "
                             f"~/.cache/kvtier/results; --results-dir {REPOSITORY_RESULTS} saves them into the "
                             f"repository's record)")


def machine() -> Dict[str, object]:
    import torch  # here, so that commands declaring --results-dir do not load it

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


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The running command as a user would type it (`python -m kvtier ...`, `kvtier ...`,
    `python benchmarks/x.py ...`), without the directories of the machine it ran on."""
    args = list(sys.argv if argv is None else argv)
    if not args:
        return ""
    first = pathlib.Path(args[0])
    if first.name == "__main__.py":
        head = ["python", "-m", first.parent.name]
    else:
        if first.is_absolute():
            try:
                first = first.relative_to(pathlib.Path.cwd())
            except ValueError:
                first = pathlib.Path(first.name)
        head = ["python", first.as_posix()] if first.suffix == ".py" else [first.name]
    return shlex.join(head + args[1:])


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=pathlib.Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_commit() -> Optional[str]:
    """The commit of the kvtier checkout this code runs from, or None (no git, not a checkout);
    `<commit>+dirty` where kvtier/ or native/ had changes that were not committed."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "../../kvtier", "../../native")
    return f"{head}+dirty" if dirty else head


# The code a run executes is the code it imported when it started: a long run records the commit
# of its start, not of the checkout when it ends (which may have moved on meanwhile).
_STARTED: Dict[str, Optional[str]] = {}


def started_commit() -> Optional[str]:
    """source_commit() as of this process's first call (this module is imported as a command starts)."""
    if "commit" not in _STARTED:
        _STARTED["commit"] = source_commit()
    return _STARTED["commit"]


def provenance() -> Dict[str, Optional[str]]:
    """When and by which command a result is being written, and the commit its run started from."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {"date": now.isoformat(), "command": command_line(), "commit": started_commit()}


def write(name: str, payload: Dict[str, object], table: str, *,
          out_dir: Optional[os.PathLike] = None) -> pathlib.Path:
    """`name`.json (payload plus `provenance()`, unless the payload sets those keys) and `name`.md,
    in `out_dir` (None: `results_dir()`)."""
    out = results_dir(out_dir)
    payload = {**provenance(), **payload}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(table)
    return out / f"{name}.json"
