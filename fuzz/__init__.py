"""Coverage-guided fuzzing of socks6fast with atheris (libFuzzer); see fuzz/README in README.md "Fuzzing".

Run a target: ``python -m fuzz run TARGET --seconds N`` (always inside its own network
namespace). Nothing here imports socks6fast at import time: the engine imports it inside
``atheris.instrument_imports()`` so that its bytecode carries coverage counters.
"""
