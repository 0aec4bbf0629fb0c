"""`cumo_megatron.torchrun`: torch's torchrun, ending a failed job with the failed rank's exit status
and torchrun's report of it, without the launcher's traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cumo_megatron.torchrun import exit_status
from tests.helpers.distributed import ROOT


def run_launcher(script_text: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    """``python -m cumo_megatron.torchrun --nproc-per-node 2 SCRIPT`` on a script of ``script_text``."""
    script = tmp_path / "rank.py"
    script.write_text(script_text)
    full_env = {k: v for k, v in os.environ.items() if k != "CUMO_DEBUG"}
    full_env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "cumo_megatron.torchrun", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", "0", str(script)],
                          env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("code, status", [(0, 1), (1, 1), (4, 4), (300, 255), (-9, 137), (-15, 143)])
def test_exit_status_reads_as_a_shell_reports_it(code, status):
    assert exit_status(code) == status


def test_a_failed_rank_ends_the_job_with_its_status_and_no_traceback(tmp_path):
    result = run_launcher("import os, sys\nif os.environ['RANK'] == '1':\n"
                          "    print('data error: bad record', file=sys.stderr)\n    sys.exit(4)\n", tmp_path)
    assert result.returncode == 4, result.stderr
    assert "data error: bad record" in result.stderr and "exitcode  : 4" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_a_rank_killed_by_a_signal_exits_128_plus_the_signal(tmp_path):
    result = run_launcher("import os, signal\nif os.environ['RANK'] == '0':\n"
                          "    os.kill(os.getpid(), signal.SIGKILL)\n", tmp_path)
    assert result.returncode == 128 + 9, result.stderr
    assert "SIGKILL" in result.stderr and "Traceback" not in result.stderr


def test_success_exits_0_and_debug_keeps_the_traceback(tmp_path):
    assert run_launcher("print('ok')\n", tmp_path).returncode == 0
    debug = run_launcher("import sys\nsys.exit(3)\n", tmp_path, CUMO_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ChildFailedError" in debug.stderr
