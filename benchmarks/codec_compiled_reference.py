"""Does the hand-written Cython codec twin earn its upkeep? (issue 9, item 5)

The alternative to keeping ``src_pyx/socks6fast/proto/_codec_c.pyx`` by hand is to
compile the pure-Python reference ``socks6fast/proto/_codec_py.py`` with Cython, with an
augmenting ``.pxd`` typing the hot decode path (aiohttp's ``reader_c`` approach). This
script builds that compiled reference in a temporary directory (the installed
package's own ``_codec_py.py``, Cython pure-Python mode, ``-O2``) and times, on the same
inputs in one interleaved run, the hand twin (``c``), the compiled reference (``pyc``)
and the interpreted reference (``py``): the best of several rounds, ns per call.

Run from a venv with socks6fast installed (compiled) and Cython available::

    python benchmarks/codec_compiled_reference.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import timeit
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from socks6fast.constants import AuthReplyType
from socks6fast.proto import _codec_py
from socks6fast.proto.messages import AssociationInit, AuthReply, IdempotenceWindow, SessionID

#: Typed locals for the compiled reference's hot decode path (the augmenting .pxd).
AUGMENT_PXD = textwrap.dedent(
    """
    cimport cython

    cpdef Py_ssize_t _pad4(Py_ssize_t n)

    @cython.locals(pos=Py_ssize_t, end=Py_ssize_t, kind=Py_ssize_t, length=Py_ssize_t, options=list)
    cpdef tuple _walk_options(object view, Py_ssize_t pos, Py_ssize_t end, frozenset placed=*)

    @cython.locals(available=Py_ssize_t, smallest=Py_ssize_t, code=Py_ssize_t,
                   options_length=Py_ssize_t, atyp=Py_ssize_t, field_length=Py_ssize_t,
                   name_length=Py_ssize_t, total=Py_ssize_t, options_start=Py_ssize_t,
                   port=Py_ssize_t)
    cpdef tuple _decode_addressed(object data, Py_ssize_t offset,
                                  Py_ssize_t max_options_length, bint is_request)

    @cython.locals(name_length=Py_ssize_t, end=Py_ssize_t)
    cpdef str _decode_name(object view, Py_ssize_t pos)
    """
)


def build_compiled_reference(workdir: Path) -> ModuleType:
    """Compile the installed _codec_py.py as socks6fast.proto._codec_pyc and import it."""
    source = Path(_codec_py.__file__)
    package = workdir / "socks6fast" / "proto"
    package.mkdir(parents=True)
    shutil.copy(source, package / "_codec_pyc.py")
    (package / "_codec_pyc.pxd").write_text(AUGMENT_PXD)
    setup = workdir / "build_pyc.py"
    setup.write_text(
        textwrap.dedent(
            """
            from Cython.Build import cythonize
            from setuptools import Extension, setup
            ext = Extension("socks6fast.proto._codec_pyc", ["socks6fast/proto/_codec_pyc.py"],
                            extra_compile_args=["-O2"])
            setup(ext_modules=cythonize([ext], compiler_directives={"language_level": 3,
                  "annotation_typing": False}), script_args=["build_ext", "--inplace"])
            """
        )
    )
    subprocess.run([sys.executable, str(setup)], cwd=workdir, check=True, capture_output=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = package / f"_codec_pyc{suffix}"
    # Loaded under the installed package's name, so its relative imports resolve there.
    spec = importlib.util.spec_from_file_location("socks6fast.proto._codec_pyc", built)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cases() -> dict[str, Callable[[Any], object]]:
    """The operations timed, on the inputs of benchmarks/bench_codec.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import bench_codec as b  # noqa: PLC0415 (inputs shared with the codec benchmarks)

    py = _codec_py
    reply_wire = py.encode_operation_reply(b.REPLY)
    auth = AuthReply(AuthReplyType.SUCCESS, (SessionID(bytes(16)), IdempotenceWindow(12345, 16)))
    auth_wire = py.encode_auth_reply(auth)
    buf = bytearray(512)
    header_v4 = bytes(buf[: py.encode_datagram_header(b.HEADER_IPV4, buf, 0)])
    header_name = bytes(buf[: py.encode_datagram_header(b.HEADER_DOMAIN, buf, 0)])
    init = AssociationInit(bytes(8))
    init_wire = py.encode_association_message(init)
    options_wire = py.encode_options(b.REQUEST.options)
    return {
        "decode_request": lambda m: m.decode_request(b.REQUEST_WIRE),
        "encode_request": lambda m: m.encode_request(b.REQUEST),
        "decode_operation_reply": lambda m: m.decode_operation_reply(reply_wire),
        "encode_operation_reply": lambda m: m.encode_operation_reply(b.REPLY),
        "decode_auth_reply": lambda m: m.decode_auth_reply(auth_wire),
        "encode_auth_reply": lambda m: m.encode_auth_reply(auth),
        "decode_options": lambda m: m.decode_options(options_wire),
        "encode_options": lambda m: m.encode_options(b.REQUEST.options),
        "decode_datagram_header (IPv4)": lambda m: m.decode_datagram_header(header_v4),
        "decode_datagram_header (name)": lambda m: m.decode_datagram_header(header_name),
        "encode_datagram_header (IPv4)": lambda m: m.encode_datagram_header(b.HEADER_IPV4, buf, 0),
        "decode_association_message": lambda m: m.decode_association_message(init_wire),
        "encode_association_message": lambda m: m.encode_association_message(init),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the best is quoted")
    args = parser.parse_args(argv)
    codec_c = importlib.import_module("socks6fast.proto._codec_c")
    with tempfile.TemporaryDirectory() as tmp:
        compiled = build_compiled_reference(Path(tmp))
        twins = {"c": codec_c, "pyc": compiled, "py": _codec_py}
        table = cases()
        for name, call in table.items():  # all three agree before anything is timed
            assert all(call(m) == call(_codec_py) for m in twins.values()), name
        print(f"{'operation':32} {'c ns':>7} {'pyc ns':>8} {'py ns':>8} {'pyc / c':>8} {'py / pyc':>9}")
        for name, call in table.items():
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for key, module in twins.items():
                    number = 20_000 if key == "c" else 2_000
                    seconds = timeit.timeit(functools.partial(call, module), number=number)
                    best[key] = min(best.get(key, float("inf")), seconds / number * 1e9)
            print(
                f"{name:32} {best['c']:7.0f} {best['pyc']:8.0f} {best['py']:8.0f}"
                f" {best['pyc'] / best['c']:8.1f} {best['py'] / best['pyc']:9.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
