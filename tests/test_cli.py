"""The command line: every flag documented, bad values and bad model paths fail at start with
one line (exit 2, no traceback) before any worker starts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from minisgl.args import ServerArgs


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minisgl", *argv], capture_output=True, text=True, timeout=120
    )


def test_help_documents_every_flag() -> None:
    out = _run("--help").stdout
    for f in dataclasses.fields(ServerArgs):
        if f.repr:
            assert "--" + f.name.replace("_", "-") in out, f.name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "m", "--port", "0"], "--port must be in 1..65535"),
        (["--model", "m", "--cache", "lru"], "--cache must be radix or naive"),
        (["--model", "m", "--memory-ratio", "2"], "--memory-ratio must be in (0, 1]"),
        (["--model", "m", "--tp", "x"], "invalid int value"),
        (["--model", "/no/such/dir"], "is not a model directory"),
        ([], "--model is required"),
    ],
)
def test_bad_arguments_fail_with_one_line(argv: list[str], message: str) -> None:
    r = _run(*argv)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
