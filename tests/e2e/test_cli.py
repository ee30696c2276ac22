"""The command line: every flag documented, bad values and bad model paths fail at start with
one line (exit 2, no traceback) before any worker starts."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minisgl.args import ServerArgs

PACKAGE = Path(__file__).resolve().parents[2] / "python" / "minisgl"


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minisgl", *argv],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_help_documents_every_flag() -> None:
    """--help names the flag of every ServerArgs field."""
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
        ([], "the following arguments are required: --model"),
    ],
)
def test_bad_arguments_fail_with_one_line(argv: list[str], message: str) -> None:
    """A bad value (port, cache, memory ratio, a non-integer --tp), a path that is not a model
    directory or a missing --model exits with status 2 and one stderr line naming the problem, no
    traceback."""
    r = _run(*argv)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_help_groups_defaults_env_vars_and_version() -> None:
    """--help shows --model as required, groups the flags under model, engine, HTTP server and
    shell, gives each default at most once and never an empty or None one, and lists every MINISGL_*
    variable the package reads; --version prints "minisgl 0.1.0"."""
    r = _run("--help")
    assert r.returncode == 0
    out = r.stdout
    usage = out.split("\n\n")[0]
    assert re.search(r"\s--model MODEL\b", usage) and "[--model" not in usage  # required
    for title in ("model:", "engine:", "HTTP server:", "interactive shell (--shell):"):
        assert f"\n{title}\n" in out, title
    flat = " ".join(out.split())  # argparse wraps the help texts
    assert flat.count("(default:") == len(re.findall(r"\(default: [^)]+\)", flat))
    assert "(default: )" not in flat and "(default: None)" not in flat
    assert not re.search(r"\(default:[^)]*\) \(default:", flat)  # never twice
    assert (
        "--api-key API_KEY require 'Authorization: Bearer KEY' on every /v1 route and /generate"
        in flat
    )
    # every MINISGL_* variable the package reads is listed
    read = set()
    for f in PACKAGE.rglob("*.py"):
        read |= set(re.findall(r"\"(MINISGL_[A-Z0-9_]+)\"", f.read_text()))
    assert len(read) >= 9
    env_part = out.split("environment variables:")[1]
    assert not [v for v in read if v not in env_part], read
    v = _run("--version")
    assert v.returncode == 0 and v.stdout.strip() == "minisgl 0.1.0"


def test_help_does_not_import_torch() -> None:
    """What makes --help fast (0.04 s instead of 1 s here): nothing heavy is imported."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "minisgl", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0
    heavy = [
        ln for ln in r.stderr.splitlines() if re.search(r"\| (torch|transformers|uvicorn)$", ln)
    ]
    assert not heavy, heavy


@pytest.mark.parametrize("model", ["Qwen/Qwen3-0.6B", "no-such-org/no-such-model"])
def test_unavailable_hub_model_is_one_line_before_any_worker(model: str, tmp_path: Path) -> None:
    """A hub id that is not in the local cache while the hub is offline exits with status 2, with or
    without --shell, printing nothing on stdout (no worker started) and one stderr line saying the
    model cannot be found."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))  # an empty cache
    for flags in ([], ["--shell"]):
        r = _run("--model", model, "--device", "cpu", *flags, env=env)
        assert r.returncode == 2
        assert r.stdout == ""  # no worker started, no server line
        assert r.stderr.strip() == (
            f"python -m minisgl: error: cannot find model {model!r}: not in the local Hugging "
            "Face cache, and the hub cannot be reached"
        )


def test_hub_id_resolved_once_and_served_under_its_name(small_llama_dir: str, tmp_path: Path):
    """A hub id in the local cache: the launcher hands the workers the snapshot directory, and
    the served model name stays the id (unless --served-model-name says otherwise)."""
    repo = tmp_path / "hub" / "models--tiny-org--small-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(small_llama_dir, repo / "snapshots" / ("0" * 40))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    code = (
        "import sys; from minisgl.__main__ import _parse; a = _parse(sys.argv[1:]); "
        "print(a.model); print(a.model_name)"
    )
    for extra, name in [([], "tiny-org/small-llama"), (["--served-model-name", "x"], "x")]:
        r = subprocess.run(
            [sys.executable, "-c", code, "--model", "tiny-org/small-llama", *extra],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [str(repo / "snapshots" / ("0" * 40)), name]


def test_shell_without_tokenizer_fails_at_start(qwen3_06b_config_dir: str) -> None:
    """--shell on a model without a tokenizer exits with status 2 and one stderr line saying --shell
    needs a tokenizer."""
    r = _run("--model", qwen3_06b_config_dir, "--shell", "--dummy-weight", "--device", "cpu")
    assert r.returncode == 2 and "--shell needs a tokenizer" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
