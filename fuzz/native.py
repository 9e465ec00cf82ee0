"""A copy of ``_codec_c`` compiled with ``-fsanitize=fuzzer-no-link``, so libFuzzer sees its C edges.

    python -m fuzz build-native            # or: python -m fuzz run codec_c --native ...

Without it the ``codec_c`` target sees only the Python-visible side of the twin (its
answers, through the checks), which guides almost nothing: the twin's branches are C.
The copy is built from ``src_pyx/`` by the project's own setup.py (SOCKS6FAST_BUILD_ONLY)
with clang (Debian: ``apt-get install clang``; gcc has no libFuzzer instrumentation) into
``fuzz/.work/native/`` and never installed: the targets load it by path, and libFuzzer's
hooks come from atheris's own libFuzzer (see ``_engine``). No sanitizer is linked in: an
ASan build would need atheris's ``asan_with_fuzzer.so``, which its binary wheel lacks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fuzz" / ".work" / "native"
SOURCE = ROOT / "src_pyx" / "socks6fast" / "proto" / "_codec_c.pyx"


def built() -> Path | None:
    """The native copy, if it was built from the current source."""
    found = sorted((OUT / "lib" / "socks6fast" / "proto").glob("_codec_c.*.so"))
    if found and found[0].stat().st_mtime >= SOURCE.stat().st_mtime:
        return found[0]
    return None


def build() -> Path:
    """Build the copy (about a minute); raises RuntimeError with one sentence on failure."""
    clang = shutil.which("clang")
    if clang is None:
        raise RuntimeError("the native build needs clang (Debian: apt-get install clang)")
    env = dict(
        os.environ,
        CC=clang,
        LDSHARED=f"{clang} -shared",
        CFLAGS="-fsanitize=fuzzer-no-link",
        SOCKS6FAST_BUILD_ONLY="_codec_c",
    )
    env.pop("SOCKS6FAST_NO_EXTENSIONS", None)
    command = [
        sys.executable, "setup.py", "-q", "build_ext", "--force",
        "--build-lib", str(OUT / "lib"), "--build-temp", str(OUT / "tmp"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    path = built()
    if result.returncode != 0 or path is None:
        raise RuntimeError(f"the native build failed: {result.stderr.strip().splitlines()[-1:]}")
    return path
