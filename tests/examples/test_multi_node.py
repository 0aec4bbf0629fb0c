"""Multi-node launches that form one job (bash style), run for real on this machine.

Two launchers of ``examples/stage2.sh`` started at once, each with ``NNODES=2``, one process per
"node" and ``MASTER_ADDR=127.0.0.1``, must meet in one world of 2 ranks and train exactly as one
node running 2 processes (``NNODES=1 GPUS_PER_NODE=2``): the same losses, bit for bit, step by
step. Both rendezvous kinds the launcher emits are run that way: static (``--node-rank``,
``--master-addr``) and c10d (``--rdzv-endpoint MASTER_ADDR:MASTER_PORT``). The tiny CPU model
trains 2 steps with gloo; each launch takes some 30 s on 2 cores.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.examples.test_launch_scripts import SCRIPTS, clean_env
from tests.training.workers import _LAUNCH_MARK, _kill_marked, experiment, make_dataset, read_metrics, write_config

STEPS = 2
# Compared bit for bit: the same world of 2 ranks computes the same numbers however it met.
EXACT_KEYS = ("loss", "lm_loss", "grad_norm", "lr")
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    """The tiny dense stage-2 CuMo on the tiny dataset, fp32 local layers: 2 steps of 2 samples."""
    root = tmp_path_factory.mktemp("multi-node")
    dataset = make_dataset(root / "data")
    cfg = experiment(dataset, str(root / "unused"), stage=2, train_steps=STEPS, global_batch_size=2,
                     micro_batch_size=1, save_interval=0)
    assert (cfg.model.spec, cfg.model.precision, cfg.model.fp8) == ("local", "fp32", None)
    return write_config(cfg, root / "stage2_tiny.yaml")


def launch_nodes(config: Path, save: Path, nodes: list[dict[str, str]]) -> list[subprocess.CompletedProcess]:
    """Start ``bash examples/stage2.sh`` once per entry of ``nodes`` (its variables), all at once.

    Waits for all of them; whatever any leaves behind is killed (found by a marker in the
    environment: torchrun puts each rank in a session of its own).
    """
    mark = uuid.uuid4().hex
    common = dict(CONFIG=str(config), SAVE=str(save), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                  CUMO_CPU_THREADS="1",
                  OMP_NUM_THREADS="1", **{_LAUNCH_MARK: mark})
    procs = []
    try:
        for node in nodes:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            proc = subprocess.Popen(["bash", str(SCRIPTS[2])], env=clean_env(**common, **node), cwd="/",
                                    stdout=out, stderr=err, start_new_session=True)
            procs.append((proc, out, err))
        return [_finish(*started) for started in procs]
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        _kill_marked(mark)


def _finish(proc: subprocess.Popen, out, err) -> subprocess.CompletedProcess:
    try:
        returncode = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        returncode = None  # reported below with the output so far
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(proc.args, returncode, out.read(), err.read())


def _check(results: list[subprocess.CompletedProcess]) -> None:
    for i, result in enumerate(results):
        assert result.returncode == 0, (
            f"launcher {i} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")


def _losses(save: Path) -> list[tuple]:
    rows = read_metrics(save)
    return [(row["step"], *(row[key] for key in EXACT_KEYS)) for row in rows]


@pytest.fixture(scope="module")
def one_node(tiny_config, tmp_path_factory) -> list[tuple]:
    """Per-step metrics of the reference: one node, two processes."""
    save = tmp_path_factory.mktemp("one-node") / "run"
    _check(launch_nodes(tiny_config, save, [dict(NNODES="1", GPUS_PER_NODE="2")]))
    losses = _losses(save)
    assert [row[0] for row in losses] == list(range(1, STEPS + 1))
    return losses


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_form_one_job_and_train_like_one_node(rendezvous, tiny_config, one_node, tmp_path):
    save = tmp_path / "run"
    nodes = [dict(NNODES="2", NODE_RANK=str(rank), GPUS_PER_NODE="1", RDZV_BACKEND=rendezvous)
             for rank in (0, 1)]
    results = launch_nodes(tiny_config, save, nodes)
    _check(results)

    # Each launcher ran the rendezvous flags of its kind, and warned about the loopback address.
    for rank, result in enumerate(results):
        command, = [line for line in result.stdout.splitlines() if " -m cumo_megatron.torchrun " in line]
        if rendezvous == "static":
            assert f"--node-rank {rank} --master-addr 127.0.0.1 --master-port " in command
        else:
            assert "--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:" in command and "--node-rank" not in command
        assert "warning: NNODES=2 but MASTER_ADDR=127.0.0.1" in result.stderr
    assert len(one_node) >= 2
    assert _losses(save) == one_node
