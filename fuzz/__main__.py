"""``python -m fuzz``: run the fuzz targets (README.md, "Fuzzing").

    python -m fuzz list
    python -m fuzz run TARGET --seconds 60      # or --runs N; --corpus-only replays the corpus
    python -m fuzz run TARGET ... -- -dict=F    # flags after -- go to libFuzzer
    python -m fuzz seeds                        # rewrite fuzz/corpus/ from the tests' messages
    python -m fuzz build-native                 # _codec_c with libFuzzer edges (needs clang)

``run`` always runs the target inside a network namespace of its own (``unshare -n``, lo
up): see ``_netns``. New inputs go to ``fuzz/.work/TARGET/corpus`` (not committed), crash
reproducers to ``fuzz/.work/TARGET/``; the committed seeds in ``fuzz/corpus/TARGET`` are
only read. The last line is a summary: executions, libFuzzer's ``cov``/``ft``, crashes.
A crash input is replayed with ``python -m fuzz run TARGET --replay FILE``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from fuzz import _netns, native
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
WORK = ROOT / "fuzz" / ".work"
#: The two state-machine targets decode with the reference codec by default: its branches
#: are Python, so libFuzzer's coverage sees them (the Cython twin is held to the same
#: answers by codec_diff). ``--codec c`` runs them on the twin.
CODEC_CHOICE = {"server", "client"}
#: Targets that need the compiled twin.
NEEDS_C = {"codec_c", "codec_diff"}

_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+).*?exec/s: (\d+)")
_EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the targets")
    run = sub.add_parser("run", help="run one target inside its own network namespace")
    run.add_argument("target", help="one of: " + ", ".join(TARGETS))
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=int, help="stop after this many seconds (default 60)")
    budget.add_argument("--runs", type=int, help="stop after this many executions past the corpus")
    budget.add_argument("--corpus-only", action="store_true", help="replay the corpus, no mutation")
    budget.add_argument("--replay", type=Path, metavar="FILE", help="run one input (a crash reproducer)")
    run.add_argument("--workdir", type=Path, help="new corpus and crashes (default fuzz/.work/TARGET)")
    run.add_argument("--codec", choices=("py", "c"), default="py", help="server/client: codec twin (py)")
    run.add_argument("--native", action="store_true", help="codec_c/codec_diff: load the build-native copy")
    run.add_argument("--max-len", type=int, default=4096, help="largest input in bytes (4096)")
    run.add_argument("--seed", type=int, help="libFuzzer's random seed")
    run.add_argument("--nice", type=int, default=10, help="nice increment (10: the machine is shared)")
    sub.add_parser("seeds", help="rewrite fuzz/corpus/ from the tests' messages")
    sub.add_parser("build-native", help="build _codec_c with -fsanitize=fuzzer-no-link (clang)")
    return parser


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    # Everything after "--" goes to libFuzzer as it is (e.g. -- -dict=FILE -only_ascii=1).
    ours, extra = (
        (given[: given.index("--")], given[given.index("--") + 1 :]) if "--" in given else (given, [])
    )
    args = _parser().parse_args(ours)
    args.libfuzzer = extra
    if args.command == "list":
        for name, what in TARGETS.items():
            print(f"{name:12} {what}")
        return 0
    if args.command == "seeds":
        from fuzz import seeds  # noqa: PLC0415 (imports the tests, only for this command)

        seeds.main()
        return 0
    if args.command == "build-native":
        try:
            print(native.build())
        except RuntimeError as exc:
            _netns.die(str(exc))
        return 0
    if args.target not in TARGETS:
        _netns.die(f"unknown target {args.target!r}; the targets are: {', '.join(TARGETS)}")
    for name in ("seconds", "runs", "max_len"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "runs" else 0):
            _netns.die(f"--{name.replace('_', '-')} must be a positive number, not {value}")
    if args.replay is not None and not args.replay.is_file():
        _netns.die(f"--replay {args.replay}: no such file")
    if args.target in NEEDS_C and os.environ.get("SOCKS6FAST_NO_EXTENSIONS"):
        _netns.die(f"{args.target} needs the compiled twin: unset SOCKS6FAST_NO_EXTENSIONS")
    if args.codec == "c" and os.environ.get("SOCKS6FAST_NO_EXTENSIONS"):
        _netns.die("--codec c needs the compiled twin: unset SOCKS6FAST_NO_EXTENSIONS")
    if args.native and args.target not in NEEDS_C:
        _netns.die(f"--native is for {' and '.join(sorted(NEEDS_C))}, not {args.target}")
    if args.native and native.built() is None:
        try:
            native.build()  # before unshare: the build itself needs no network either, but is slow
        except RuntimeError as exc:
            _netns.die(str(exc))
    _netns.ensure(["-m", "fuzz", *given])
    return _run(args)


def _libfuzzer_flags(args: argparse.Namespace, workdir: Path) -> list[str]:
    flags = [
        f"-artifact_prefix={workdir}/",
        f"-max_len={args.max_len}",
        "-timeout=10",  # one input that takes 10 s is a hang (REQ-07: stateless, linear decoders)
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
    ]
    if args.seed is not None:
        flags.append(f"-seed={args.seed}")
    if args.replay is not None:
        return [*flags, *args.libfuzzer, str(args.replay)]
    if args.corpus_only:
        flags.append("-runs=0")
    elif args.runs is not None:
        flags.append(f"-runs={args.runs}")
    else:
        flags.append(f"-max_total_time={args.seconds or 60}")
    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / args.target
    # libFuzzer writes new inputs to the first directory only: the committed seeds stay as they are.
    return [*flags, *args.libfuzzer, str(corpus), *([str(seeds)] if seeds.is_dir() else [])]


def _run(args: argparse.Namespace) -> int:
    workdir = (args.workdir or WORK / args.target).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)  # for `fuzz`; fuzz.sut drops it again before importing socks6fast
    if args.target in CODEC_CHOICE and args.codec == "py":
        env["SOCKS6FAST_NO_EXTENSIONS"] = "1"
    if args.native:
        env["SOCKS6FAST_FUZZ_NATIVE"] = str(native.built())
    command = [sys.executable, "-m", "fuzz._engine", args.target, *_libfuzzer_flags(args, workdir)]
    print(
        f"fuzz: {args.target} in an isolated network namespace (interfaces: lo); {' '.join(command[3:])}",
        file=sys.stderr,
        flush=True,
    )
    if args.nice:
        os.nice(args.nice)
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    status: re.Match[str] | None = None
    executed: int | None = None
    artifacts: list[str] = []
    with (workdir / "last.log").open("w") as log:
        for line in proc.stdout:
            sys.stderr.write(line)
            log.write(line)
            if m := _STATUS.match(line):
                status = m
            elif m := _EXECUTED.search(line):
                executed = int(m.group(1))
            elif m := _ARTIFACT.search(line):
                artifacts.append(m.group(1))
    code = proc.wait()
    elapsed = time.monotonic() - started
    execs = executed if executed is not None else int(status.group(1)) if status else 0
    cov = (
        f"cov={status.group(3)} ft={status.group(4)} corpus={status.group(5)}/{status.group(6)}"
        if status
        else "cov=?"
    )
    print(
        f"fuzz: target={args.target} execs={execs} {cov} seconds={elapsed:.0f} "
        f"execs/s={execs / elapsed if elapsed else 0:.0f} crashes={len(artifacts)} exit={code}"
        + "".join(f"\nfuzz: crash input {path}" for path in artifacts),
        file=sys.stderr,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
