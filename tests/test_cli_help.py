"""``photolens --help`` and ``photolens <cmd> --help`` import no heavy library and answer quickly."""

from __future__ import annotations

import json
import subprocess
import sys
import time

HEAVY = ("torch", "torchvision", "cv2", "faiss", "ray", "deltalake", "sklearn", "scipy", "polars", "boto3")
HELPS: tuple[tuple[str, ...], ...] = ((), ("tag",), ("forget",), ("friends", "import"), ("eval", "detection"),
                                      ("eval", "clustering"), ("landmarks", "build"), ("index", "build"), ("models",))
# Runs the CLI's parser the way ``python -m photolens.cli`` does, for every help above in one process (so
# anything any of them imports shows), then reports what got imported.
PROBE = """
import json, sys
from photolens import cli
for argv in {helps!r}:
    try:
        cli.main([*argv, "--help"])
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


def test_help_imports_no_heavy_module() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE.format(helps=HELPS, heavy=HEAVY)], capture_output=True,
                         text=True, timeout=120, check=False)
    loaded = json.loads(out.stderr.strip().splitlines()[-1])
    assert loaded == [], f"--help imported {loaded}"
    assert out.stdout.count("usage: photolens") == len(HELPS)
    for argv in HELPS[1:]:
        assert f"usage: photolens {' '.join(argv)}" in out.stdout


def test_help_is_quick() -> None:
    # The real figure is printed; the bound is loose because the test machines are shared.
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "photolens.cli", "--help"], capture_output=True, text=True,
                         timeout=60, check=True)
    seconds = time.perf_counter() - started
    print(f"photolens --help: {seconds:.2f} s")
    assert "friends" in out.stdout and "forget" in out.stdout
    assert seconds < 3.0


def test_parser_defaults_match_their_sources() -> None:
    from photolens.faceindex import cluster
    from photolens.jobs import commands
    from photolens.udfs.recognize import DEFAULT_MODELS

    assert commands.LINKAGES == cluster.LINKAGES
    assert commands.DEFAULT_EUCLIDEAN_THRESHOLD == cluster.DEFAULT_EUCLIDEAN_THRESHOLD
    assert commands.DEFAULT_RANK_ORDER_K == cluster.DEFAULT_RANK_ORDER_K
    assert DEFAULT_MODELS["detect"] == commands.DEFAULT_DETECTOR


def test_every_handler_resolves_to_a_job_function() -> None:
    """Each lazy handler names a function that exists (a typo would only show when the command runs)."""
    import argparse
    import importlib

    from photolens.cli import build_parser
    from photolens.jobs.commands import LazyHandler

    def walk(parser: argparse.ArgumentParser) -> list[object]:
        found = [parser.get_default("handler")]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found += walk(sub)
        return found

    lazy = [h for h in walk(build_parser()) if isinstance(h, LazyHandler)]
    assert len(lazy) >= 10
    for h in lazy:
        assert callable(getattr(importlib.import_module(h.module), h.function)), h
