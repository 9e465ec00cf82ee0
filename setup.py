"""Build the Cython extensions from src_pyx/ (STYLE.md sections 3.4 and 6).

Switches (environment variables):
  SOCKS6FAST_NO_EXTENSIONS=1  pure-Python build, no compiled modules
  SOCKS6FAST_DEBUG=1          -O0 -g3, Cython debug checks on
  SOCKS6FAST_CYTHON_TRACE=1   line tracing for coverage
  SOCKS6FAST_ANNOTATE=1       write Cython's HTML annotation next to the .pyx
  SOCKS6FAST_BUILD_ONLY=a,b   build only these modules (development)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent
NO_EXTENSIONS = bool(os.environ.get("SOCKS6FAST_NO_EXTENSIONS")) or sys.implementation.name != "cpython"
DEBUG = bool(os.environ.get("SOCKS6FAST_DEBUG"))
TRACE = bool(os.environ.get("SOCKS6FAST_CYTHON_TRACE"))
ANNOTATE = bool(os.environ.get("SOCKS6FAST_ANNOTATE"))
# Developer switch: build only these comma-separated modules (e.g. "_codec_c").
BUILD_ONLY = {n for n in os.environ.get("SOCKS6FAST_BUILD_ONLY", "").split(",") if n}

# Modules that only make sense on Linux (splice, epoll, recvmmsg).
LINUX_ONLY = {"_relay_c", "_udp_c"}


def extensions() -> list[Extension]:
    from Cython.Build import cythonize  # noqa: PLC0415 (build-time only: not needed with SOCKS6FAST_NO_EXTENSIONS)

    cflags = ["-O0", "-g3", "-UNDEBUG"] if DEBUG else ["-O2"]
    macros: list[tuple[str, str | None]] = [("SOCKS6FAST_DEBUG", "1" if DEBUG else "0")]
    if TRACE:
        macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
    exts = []
    # src_pyx/ mirrors the package: src_pyx/socks6fast/proto/_codec_c.pyx builds
    # socks6fast.proto._codec_c.
    for pyx in sorted((HERE / "src_pyx" / "socks6fast").rglob("*.pyx")):
        name = pyx.stem
        if name in LINUX_ONLY and not sys.platform.startswith("linux"):
            continue
        if BUILD_ONLY and name not in BUILD_ONLY:
            continue
        module = ".".join(pyx.relative_to(HERE / "src_pyx").with_suffix("").parts)
        exts.append(
            Extension(
                module,
                [str(pyx.relative_to(HERE))],
                include_dirs=[str(HERE / "src_pyx" / "socks6fast" / "includes")],
                extra_compile_args=cflags,
                define_macros=macros,
            )
        )
    directives = {"language_level": 3, "embedsignature": True}
    if TRACE:
        directives["linetrace"] = True
    return cythonize(
        exts,
        include_path=["src_pyx"],
        compiler_directives=directives,
        annotate=ANNOTATE,
    )


if NO_EXTENSIONS:
    print("*** socks6fast: Pure build (SOCKS6FAST_NO_EXTENSIONS) ***")
    setup(ext_modules=[])
else:
    print("*** socks6fast: Accelerated build ***")
    setup(ext_modules=extensions())
