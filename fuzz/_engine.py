"""Run one target under atheris: ``python -m fuzz._engine TARGET [libFuzzer flags] [corpus dirs]``.

Started by ``python -m fuzz run`` (inside a network namespace), not by hand. socks6fast is
imported inside ``atheris.instrument_imports()`` so that libFuzzer sees the branches of its
Python code; a target that checks the Cython twin sees the Python-visible side of it (and,
with a ``build-native`` copy, its C edges too).
"""

from __future__ import annotations

import importlib
import os
import sys

if os.environ.get("SOCKS6FAST_FUZZ_NATIVE"):
    # The native copy of _codec_c calls libFuzzer's __sanitizer_cov_* hooks, which live in
    # atheris's core_with_libfuzzer module, loaded by atheris.Fuzz(): load extensions with
    # their symbols global, and the copy on the first input (see fuzz.sut.load_codec_c).
    sys.setdlopenflags(os.RTLD_NOW | os.RTLD_GLOBAL)

import atheris  # type: ignore[import-untyped]  # noqa: E402

from fuzz import _netns  # noqa: E402


def main() -> None:
    name = sys.argv[1]
    # Defence in depth: `python -m fuzz run` put us in a namespace of our own; never fuzz outside one.
    if not _netns.isolated():
        _netns.die(f"not in an isolated network namespace (interfaces: {', '.join(_netns.interfaces())})")
    print(f"fuzz: {name}: network interfaces: {', '.join(_netns.interfaces())}", file=sys.stderr, flush=True)
    with atheris.instrument_imports(include=["socks6fast"]):
        importlib.import_module("fuzz.sut")
    target = importlib.import_module(f"fuzz.targets.{name}")
    target.setup()
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target.test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
