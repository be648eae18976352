"""The build's CUDA decision (setup.py), run in a subprocess against this source tree."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_setup(override, hide_toolkit):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["INTRUDER_EXT_CUDA"] = override
    if hide_toolkit:
        path = [d for d in env.get("PATH", "").split(os.pathsep) if not os.path.exists(os.path.join(d, "nvcc"))]
        env["PATH"] = os.pathsep.join(path)
    # --version only builds the Extension description, which is where the decision is made.
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")


def test_forcing_cuda_without_a_toolkit_fails_clearly():
    result = run_setup("1", hide_toolkit=True)
    assert result.returncode != 0
    assert "INTRUDER_EXT_CUDA=1 but" in result.stderr
    assert "no CUDA toolkit was found (no nvcc on PATH, CUDA_HOME unset)" in result.stderr


def test_bad_override_value_is_refused():
    result = run_setup("maybe", hide_toolkit=False)
    assert result.returncode != 0
    assert "INTRUDER_EXT_CUDA must be 0, 1 or auto (got 'maybe')" in result.stderr


def test_forcing_cpu_builds_cpu_kernels_only():
    result = run_setup("0", hide_toolkit=False)
    assert result.returncode == 0, result.stderr
    assert "INTRUDER_EXT_CUDA=0: building CPU kernels only" in result.stderr


def test_auto_without_toolkit_falls_back_to_cpu():
    result = run_setup("auto", hide_toolkit=True)
    assert result.returncode == 0, result.stderr
    assert "building CPU kernels only" in result.stderr and "no CUDA toolkit was found" in result.stderr
