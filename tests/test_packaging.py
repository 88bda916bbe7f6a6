"""What a plain `pip install` of leapserve carries: the shipped checkpoints as package data, found by name, and the
C++ source of the CPU ops."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from leapserve.decoding.model_loader import ModelNotFoundError, resolve_model, shipped_checkpoints

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.name for p in (REPO / "checkpoints").iterdir() if (p / "config.json").is_file())


def test_shipped_checkpoints_resolve_by_name_and_a_local_path_comes_first(tmp_path, monkeypatch):
    assert sorted(shipped_checkpoints()) == SHIPPED and "smollm2-135m-instruct-fspad" in SHIPPED
    monkeypatch.chdir(tmp_path)
    for name in SHIPPED:  # from any working directory
        assert Path(resolve_model(name)) == REPO / "checkpoints" / name
    mine = tmp_path / "smollm2-135m-instruct-fspad"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "model.safetensors").write_bytes(b"")
    assert Path(resolve_model("smollm2-135m-instruct-fspad")).resolve() == mine
    with pytest.raises(ModelNotFoundError, match="shipped checkpoint.*smollm2-135m-instruct-fspad"):
        resolve_model("no-such-checkpoint")


def test_a_wheel_carries_the_shipped_checkpoints_and_finds_them_by_name(tmp_path):
    """Build the wheel as `pip install .` would, unpack it as site-packages, and resolve every shipped name from
    it, in a process that cannot see the repository (no editable finder, another working directory)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, REPO],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("leapserve-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    cpp = REPO / "kernels" / "cpu_ops.cpp"  # the C++ ops a compiled CPU model builds on first use
    assert (site / "leapserve" / "kernels" / cpp.name).read_bytes() == cpp.read_bytes()
    for name in SHIPPED:
        for f in (REPO / "checkpoints" / name).iterdir():
            assert (site / "leapserve" / "checkpoints" / name / f.name).read_bytes() == f.read_bytes()
    probe = (
        "import json, sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "from leapserve.decoding.model_loader import resolve_model, shipped_checkpoints\n"
        "print(json.dumps({n: str(resolve_model(n)) for n in shipped_checkpoints()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found == {n: str(site / "leapserve" / "checkpoints" / n) for n in SHIPPED}
