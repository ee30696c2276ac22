"""minisgl.env: one parser for every MINISGL_* variable, read when asked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from minisgl import env

DOCS = Path(__file__).resolve().parents[2] / "docs" / "features.md"


@pytest.mark.parametrize(
    "value, want",
    [(None, False), ("", False), ("0", False), ("false", False), (" Off ", False), ("no", False),
     ("1", True), ("true", True), ("YES", True), ("on", True)],
)  # fmt: skip
def test_switch_values(monkeypatch, value, want) -> None:
    """A switch variable (MINISGL_DISABLE_KERNELS) is off when unset, empty, "0", "false", " Off "
    or "no" and on for "1", "true", "YES" or "on": case and surrounding spaces do not matter."""
    if value is None:
        monkeypatch.delenv("MINISGL_DISABLE_KERNELS", raising=False)
    else:
        monkeypatch.setenv("MINISGL_DISABLE_KERNELS", value)
    assert env.disable_kernels() is want  # "0" means not disabled (any string used to disable)


def test_defaults_and_errors(monkeypatch) -> None:
    """With no MINISGL_* variable set every getter returns its default (overlap scheduling and
    decode sorting on, fused ops not disabled, 8 QK heads, 4 warps, FI decode backend "fa2", no API
    key); set variables override them, and a value that is not a switch or not an integer raises a
    ValueError naming the variable and the value."""
    for name in env.VARS:
        monkeypatch.delenv(name, raising=False)
    assert env.overlap_scheduling() and env.decode_sort() and not env.disable_fused()
    assert env.fi_tensor_cores(True) and not env.fi_tensor_cores(False)
    assert (env.qk_heads(), env.qk_warps(), env.fi_decode_backend()) == (8, 4, "fa2")
    assert env.api_key() is None
    monkeypatch.setenv("MINISGL_DECODE_SORT", "0")
    monkeypatch.setenv("MINISGL_FI_TENSOR_CORES", "0")
    monkeypatch.setenv("MINISGL_QK_HEADS", "2")
    assert not env.decode_sort() and not env.fi_tensor_cores(True) and env.qk_heads() == 2
    monkeypatch.setenv("MINISGL_DISABLE_OVERLAP_SCHEDULING", "maybe")
    with pytest.raises(ValueError, match="MINISGL_DISABLE_OVERLAP_SCHEDULING='maybe'"):
        env.overlap_scheduling()
    monkeypatch.setenv("MINISGL_QK_WARPS", "four")
    with pytest.raises(ValueError, match="MINISGL_QK_WARPS='four': expected an integer"):
        env.qk_warps()


def test_every_variable_is_documented() -> None:
    """Every variable in env.VARS is named (in backticks) in docs/features.md."""
    documented = set(re.findall(r"`(MINISGL_[A-Z0-9_]+)", DOCS.read_text()))
    assert set(env.VARS) <= documented, set(env.VARS) - documented
