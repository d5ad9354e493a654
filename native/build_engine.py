"""cffi builder of ``kvtier._native._engine``.

``setup.py`` picks up ``ffibuilder`` (``pip install -e .``); running this file
directly compiles the extension in place into ``kvtier/_native/`` for
development. The package version and a SHA-256 of the C sources are compiled
in, so the loader can refuse a build that does not match the checkout.

``--sanitize`` compiles with AddressSanitizer and UndefinedBehaviorSanitizer
(``-O1 -g``, every undefined-behaviour report fatal). Such a build needs the
ASan runtime loaded first (``LD_PRELOAD``), so it belongs in a copy of the
checkout, never the working one: ``native/sanitize.sh`` makes that copy,
builds it and runs the native tests under it.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
import sys

import cffi

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
HEADER = HERE / "kvtier_engine.h"


def source_files() -> list[pathlib.Path]:
    """Every file whose content is hashed into the build (sorted for stability)."""
    return sorted(p for p in HERE.iterdir() if p.suffix in (".c", ".h"))


def source_hash() -> str:
    h = hashlib.sha256()
    for p in source_files():
        h.update(p.name.encode())
        h.update(b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def package_version() -> str:
    text = (ROOT / "kvtier" / "__init__.py").read_text()
    m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
    if not m:
        raise RuntimeError("kvtier/__init__.py: expected a __version__ = '...' line")
    return m.group(1)


def cdef_text() -> str:
    """The header is the cdef: drop preprocessor lines and the C++ guard braces
    (the only lines that are a bare 'extern "C" {' or '}')."""
    keep = []
    for line in HEADER.read_text().splitlines():
        s = line.strip()
        if s.startswith("#") or s in ('extern "C" {', "}"):
            continue
        keep.append(line)
    return "\n".join(keep)


# -O1 keeps the stacks readable; recover=none turns every UBSan report into an abort;
# -fno-wrapv undoes Python's -fwrapv, under which signed overflow goes unreported.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g",
                  "-fno-wrapv"]


def make_builder(*, relative: bool, sanitize: bool = False) -> cffi.FFI:
    """setuptools wants source paths relative to setup.py; an in-place build
    compiles from a temporary directory and needs them absolute."""

    def path(p: pathlib.Path) -> str:
        return p.relative_to(ROOT).as_posix() if relative else str(p)

    builder = cffi.FFI()
    builder.cdef(cdef_text())
    builder.set_source(
        "kvtier._native._engine",
        '#include "kvtier_engine.h"\n',
        sources=[path(p) for p in source_files() if p.suffix == ".c"],
        include_dirs=[path(HERE)],
        define_macros=[
            ("KVT_VERSION", f'"{package_version()}"'),
            ("KVT_BUILD_HASH", f'"{source_hash()}"'),
        ],
        extra_compile_args=(["-O1", *SANITIZE_FLAGS] if sanitize else ["-O3"])
        + ["-std=c11", "-pthread", "-fno-strict-aliasing"],
        extra_link_args=(SANITIZE_FLAGS if sanitize else []) + ["-pthread", "-lm"],
    )
    return builder


ffibuilder = make_builder(relative=True)


def build_in_place(*, sanitize: bool = False) -> pathlib.Path:
    """Compile into kvtier/_native/ so a source checkout imports it without installing."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kvtier-build-") as tmp:
        so = make_builder(relative=False, sanitize=sanitize).compile(tmpdir=tmp, verbose=False)
        built = pathlib.Path(so)
        dest = ROOT / "kvtier" / "_native" / built.name
        # A new file renamed over the old one: a process that has the old library
        # mapped (a running server) keeps it, instead of crashing on rewritten pages.
        part = dest.with_name(dest.name + ".part")
        part.write_bytes(built.read_bytes())
        part.chmod(0o755)
        part.replace(dest)
    return dest


if __name__ == "__main__":
    args = sys.argv[1:]
    if args not in ([], ["--sanitize"]):
        sys.exit(f"usage: {sys.argv[0]} [--sanitize]")
    print(f"built {build_in_place(sanitize=bool(args))}", file=sys.stderr)
