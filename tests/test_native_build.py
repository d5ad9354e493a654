"""Build identity: version/hash embedded, missing or stale builds refused with rebuild hints,
and the KVTIER_ISA override."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import kvtier
import kvtier._native as N
from kvtier._native import _loader

ROOT = pathlib.Path(__file__).resolve().parents[1]


def py(code: str, env_extra=None, cwd=None, pythonpath=None):
    env = dict(os.environ)
    env.pop("KVTIER_ISA", None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(pythonpath or ROOT)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=120)


def test_embedded_identity_matches_checkout():
    info = N.build_info()
    assert info["version"] == kvtier.__version__
    assert info["build_hash"] == _loader.source_hash()
    sys.path.insert(0, str(ROOT / "native"))
    try:
        import build_engine
    finally:
        sys.path.pop(0)
    assert build_engine.source_hash() == _loader.source_hash()
    assert build_engine.package_version() == kvtier.__version__


def test_version_mismatch_is_stale():
    with pytest.raises(ImportError, match="stale.*pip install -e"):
        _loader.check_build(expected_version="999.0")


def test_changed_sources_are_stale(tmp_path):
    src = tmp_path / "native"
    shutil.copytree(ROOT / "native", src)
    _loader.check_build(src_dir=src)  # an identical copy is fine
    (src / "kvt_pool.c").write_text((src / "kvt_pool.c").read_text() + "\n/* edit */\n")
    with pytest.raises(ImportError, match="sources changed.*native/build_engine.py"):
        _loader.check_build(src_dir=src)


def test_missing_build_names_the_fix(tmp_path):
    shutil.copytree(ROOT / "kvtier", tmp_path / "kvtier",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    r = py("import kvtier._native", cwd=tmp_path, pythonpath=tmp_path)
    assert r.returncode != 0
    assert "ImportError: kvtier native engine is not built" in r.stderr
    assert "pip install -e ." in r.stderr


def test_isa_env_override():
    r = py("import kvtier._native as N; print(N.active_isa())", {"KVTIER_ISA": "generic"})
    assert r.returncode == 0 and r.stdout.strip() == "generic"
    r = py("import kvtier._native", {"KVTIER_ISA": "neon"})
    assert r.returncode != 0 and "KVTIER_ISA" in r.stderr and "neon" in r.stderr
    for isa in ("avx2", "avx512", "avx512bw", "amx"):
        r = py("import kvtier._native as N; print(N.active_isa())", {"KVTIER_ISA": isa})
        if N.isa_supported(isa):
            assert r.stdout.strip() == isa
        else:
            assert r.returncode != 0 and "not supported by this CPU" in r.stderr


def test_default_isa_is_best_supported():
    r = py("import kvtier._native as N; print(N.active_isa())")
    best = next(i for i in ("amx", "avx512", "avx2", "generic") if N.isa_supported(i))
    assert r.stdout.strip() == best
