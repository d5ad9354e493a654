"""The index of benchmarks/results: one row per result set, generated.

    python -m kvtier.bench.index           # rewrite benchmarks/results/README.md
    python -m kvtier.bench.index --check   # exit 1 when the committed index is stale

A result set is the files of one name: NAME.json, with NAME.md and NAME.png
where its bench wrote them. Each row gives the set's date, machine, command,
commit and a one-line headline, taken in this order:

- date, command, commit: the JSON's own `date`, `command`, `commit` (which
  `results.write` records), else `sources.json`, else (date and commit) the
  commit that first added NAME.json, from `git log`;
- machine: `sources.json`, else the JSON's `machine`;
- headline: `sources.json`, else one derived from the JSON of a known bench.

`sources.json` (in the results folder) maps a set's name to any of
`command`, `machine`, `headline`; it is data, filled in from each run's notes,
launch arguments and commit message.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

INDEX = "README.md"
SOURCES = "sources.json"
DEFAULT_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results"
KINDS = {"decode": "Decode (`kvtier bench decode`)", "engine": "Engine (`kvtier bench engine`)",
         "prefill": "Prefill (`kvtier bench prefill`)", "serve": "Serving (`kvtier bench serve`, `kvtier_sglang.serve_check`)",
         "eval": "Accuracy (`kvtier eval`)", "compare": "Comparison (`kvtier bench compare`)"}


class Row(NamedTuple):
    name: str
    files: Tuple[str, ...]
    date: str
    machine: str
    command: str
    commit: str
    headline: str


def result_sets(folder: pathlib.Path) -> Dict[str, List[str]]:
    """Set name -> its file suffixes, for every file of the folder but the index and sources."""
    sets: Dict[str, List[str]] = {}
    for path in sorted(folder.iterdir()):
        if path.name in (INDEX, SOURCES) or not path.is_file():
            continue
        sets.setdefault(path.stem, []).append(path.suffix.lstrip("."))
    return sets


def git_added(folder: pathlib.Path) -> Optional[Dict[str, Tuple[str, str]]]:
    """File name -> (date, commit) of the commit that first added it, or None without full history."""
    try:
        shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=folder,
                                 capture_output=True, text=True, timeout=30)
        if shallow.returncode != 0 or shallow.stdout.strip() != "false":
            return None
        log = subprocess.run(["git", "log", "--no-renames", "--diff-filter=A", "--relative", "--name-only",
                              "--date=short", "--format=%x00%H %ad", "--", "."],
                             cwd=folder, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if log.returncode != 0:
        return None
    added: Dict[str, Tuple[str, str]] = {}
    current = ("", "")
    for line in log.stdout.splitlines():
        if line.startswith("\x00"):
            commit, date = line[1:].split(" ", 1)
            current = (date, commit)
        elif line.strip():
            added[line.strip()] = current  # newest first: the last one seen is the first add
    return added


def describe_machine(machine: Any) -> str:
    if isinstance(machine, str):
        return machine
    if not isinstance(machine, dict):
        return ""
    parts = []
    if machine.get("gpu"):
        parts.append(str(machine["gpu"]).replace("NVIDIA ", ""))
    cores = machine.get("cpu_cores") or machine.get("online_cpus")
    if cores:
        parts.append(f"{cores} cores")
    if machine.get("isa"):
        parts.append(str(machine["isa"]))
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    return ", ".join(parts)


def derive_headline(data: Dict[str, Any]) -> str:
    """A one-line summary of a known bench's JSON; empty for anything else."""
    summary = data.get("summary") if isinstance(data.get("summary"), dict) else {}
    if data.get("bench") == "decode" and summary:
        parts = [f"{summary.get('context')} tokens, batch {summary.get('batch')}"]
        for policy in ("hgca", "hgca_prefilter"):
            vs_dense = summary.get(f"{policy}_vs_dense")
            if vs_dense:
                parts.append(f"{policy} {1 / vs_dense:.2f}x dense's step")
        return "; ".join(parts)
    if data.get("bench") == "serve":
        return str(data.get("headline") or "")
    if "engine_vs_stream" in data:
        return (f"engine_vs_stream={data['engine_vs_stream']:.2f} engine_vs_torch={data['engine_vs_torch']:.1f} "
                f"engine_vs_dram={data['engine_vs_dram']:.2f}")
    if isinstance(data.get("settings"), dict) and "worst_gap_points" in summary:
        s = data["settings"]
        return (f"{s.get('model')} at {','.join(map(str, s.get('contexts', [])))} tokens: worst gap at 10% "
                f"{summary['worst_gap_points']:.1f} points, window_only {summary.get('window_only_gap_points', 0):.1f}")
    if isinstance(data.get("comparison"), dict):
        return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in data["comparison"].items() if not isinstance(v, (dict, list)))
    return ""


def build_rows(folder: pathlib.Path, added: Optional[Dict[str, Tuple[str, str]]]) -> List[Row]:
    sources_path = folder / SOURCES
    sources = json.loads(sources_path.read_text()) if sources_path.exists() else {}
    rows = []
    for name, suffixes in sorted(result_sets(folder).items()):
        data = json.loads((folder / f"{name}.json").read_text()) if "json" in suffixes else {}
        data = data if isinstance(data, dict) else {}
        src = sources.get(name, {})
        first = (added or {}).get(f"{name}.json", ("", ""))
        date = str(data.get("date") or src.get("date") or first[0] or "not committed")[:10]
        commit = str(data.get("commit") or src.get("commit") or first[1] or "not committed")[:12]
        rows.append(Row(name, tuple(suffixes), date,
                        src.get("machine") or describe_machine(data.get("machine")) or "not recorded",
                        data.get("command") or src.get("command") or "not recorded", commit,
                        src.get("headline") or derive_headline(data)))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: List[Row]) -> str:
    out = ["# Benchmark results", "",
           "Generated by `python -m kvtier.bench.index` from the files in this folder; a test keeps it",
           "current, so do not edit it by hand. What each bench measures, and the results read together:",
           "[docs/benchmarks.md](../../docs/benchmarks.md) and [docs/accuracy.md](../../docs/accuracy.md).",
           "",
           "A set is `NAME.json`, with `NAME.md` (its table) and `NAME.png` where the bench drew one. Date,",
           "command and commit come from the JSON where it records them; for older results the command is",
           "from `sources.json` and the date and commit are those of the commit that added the JSON.",
           "Machine: the GPU (when the run had one), the host's cores, the engine's ISA when recorded, and",
           "torch. Runs on machines of one kind were not always on the same host: compare numbers within a set."]
    by_kind: Dict[str, List[Row]] = {}
    for row in rows:
        by_kind.setdefault(row.name.split("-", 1)[0], []).append(row)
    for kind in sorted(by_kind, key=lambda k: (list(KINDS).index(k) if k in KINDS else len(KINDS), k)):
        out += ["", f"## {KINDS.get(kind, kind)}", "",
                "| set | date | machine | command | commit | headline |", "|---|---|---|---|---|---|"]
        for r in by_kind[kind]:
            link = f"{r.name}.md" if "md" in r.files else f"{r.name}.json"
            files = ", ".join(s for s in r.files if s != "md")
            out.append(f"| [{r.name}]({link}) ({files}) | {r.date} | {_cell(r.machine)} | `{_cell(r.command)}` "
                       f"| {r.commit} | {_cell(r.headline)} |")
    return "\n".join(out) + "\n"


def generate(folder: pathlib.Path = DEFAULT_DIR, added: Optional[Dict[str, Tuple[str, str]]] = None) -> str:
    """The index text for `folder` (git history read unless `added` is given)."""
    return render(build_rows(folder, git_added(folder) if added is None else added))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvtier.bench.index", description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=pathlib.Path, default=DEFAULT_DIR, help="the results folder")
    p.add_argument("--check", action="store_true", help="exit 1 when the index differs from what it would be")
    args = p.parse_args(argv)
    if git_added(args.dir) is None:
        print("kvtier.bench.index: no full git history here (not a checkout, or a shallow one); dates and "
              "commits of older results come from it", file=sys.stderr)
        return 1
    text = generate(args.dir)
    path = args.dir / INDEX
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(f"{path} is stale: run python -m kvtier.bench.index", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
