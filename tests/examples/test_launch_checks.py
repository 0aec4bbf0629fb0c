"""What the bash-style launcher checks before any rank starts, and the documented multi-node commands.

Rendezvous flags (static or c10d) and their refusals, the loopback MASTER_ADDR warning, the
Transformer Engine check of both launch styles, and the multi-node and SLURM commands of
examples/README.md run as written (dry runs; ``srun`` and ``scontrol`` replaced by stand-ins).
"""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import types

import pytest

from cumo_megatron import launch
from cumo_megatron.config.loader import ConfigError
from tests.examples.test_launch_scripts import LAUNCH_VARIABLES, LAUNCHER, REPO, SCRIPTS, clean_env, config_file

README = REPO / "examples" / "README.md"


def dry_launch(env: dict[str, str], stage: int = 2, argv=()) -> tuple[list[str], str, str]:
    """(torchrun command, stdout, stderr) of a bash-style dry run in this process."""
    out, err = io.StringIO(), io.StringIO()
    assert launch.launch(stage, str(SCRIPTS[stage]), list(argv), {"DRY_RUN": "1", **env}, out, err) == 0
    return shlex.split(out.getvalue().strip().splitlines()[-1]), out.getvalue(), err.getvalue()


def _rendezvous_part(command: list[str]) -> list[str]:
    """The flags between ``--nproc-per-node N`` and ``-m``."""
    start = command.index("--nproc-per-node") + 2
    return command[start:command.index("-m", start)]


def _training_part(command: list[str]) -> list[str]:
    """From the ``-m`` that names the training module on."""
    return command[command.index("-m", command.index("--nproc-per-node")):]


# --------------------------------------------------------------------------- #
# Rendezvous
# --------------------------------------------------------------------------- #


@pytest.mark.usefixtures("te_installed")
@pytest.mark.parametrize("env,flags", [
    ({}, ["--node-rank", "1", "--master-addr", "node0", "--master-port", "6000"]),
    ({"RDZV_BACKEND": "static"}, ["--node-rank", "1", "--master-addr", "node0", "--master-port", "6000"]),
    ({"RDZV_BACKEND": "c10d"},
     ["--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:6000", "--rdzv-id", "cumo-stage2"]),
    ({"RDZV_BACKEND": "c10d", "RDZV_ID": "job42", "TORCHRUN_ARGS": "--max-restarts 3"},
     ["--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:6000", "--rdzv-id", "job42", "--max-restarts", "3"]),
    # The README's former example: the backend named in TORCHRUN_ARGS, either spelling.
    ({"TORCHRUN_ARGS": "--rdzv-backend c10d --max-restarts 3"},
     ["--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:6000", "--rdzv-id", "cumo-stage2", "--max-restarts", "3"]),
    ({"TORCHRUN_ARGS": "--rdzv_backend=c10d", "RDZV_BACKEND": "c10d"},
     ["--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:6000", "--rdzv-id", "cumo-stage2"]),
    ({"RDZV_BACKEND": "c10d", "MASTER_ADDR": "fd00::1"},
     ["--rdzv-backend", "c10d", "--rdzv-endpoint", "[fd00::1]:6000", "--rdzv-id", "cumo-stage2"]),
])
def test_rendezvous_flags(env, flags):
    base = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "6000"}
    command, out, _ = dry_launch({**base, **env})
    assert _rendezvous_part(command) == flags
    assert command[command.index("--nnodes") + 1] == "2"
    if "c10d" in flags:
        # torchrun reads --master-addr/--master-port/--node-rank for static rendezvous only.
        assert not {"--master-addr", "--master-port", "--node-rank"} & set(command)
        assert "# one of 2 nodes (c10d assigns node ranks): stage 2" in out
    else:
        assert "# node 1 of 2: stage 2" in out


def test_torchrun_ignores_master_addr_under_c10d():
    """What the c10d flags are for: torchrun's own endpoint rule (static only uses --master-addr)."""
    from torch.distributed.run import get_args_parser, get_rdzv_endpoint

    parser = get_args_parser()
    c10d = parser.parse_args(["--rdzv-backend", "c10d", "--master-addr", "node0", "--master-port", "6000", "x.py"])
    assert get_rdzv_endpoint(c10d) == ""  # i.e. torchrun's localhost default: every node alone
    ours = parser.parse_args([*launch.rendezvous_flags(launch.Nodes(nnodes=2, master_addr="node0", master_port=6000),
                                                       launch.Rendezvous(backend="c10d", run_id="j")), "x.py"])
    assert (ours.rdzv_backend, get_rdzv_endpoint(ours), ours.rdzv_id) == ("c10d", "node0:6000", "j")
    static = parser.parse_args([*launch.rendezvous_flags(launch.Nodes(nnodes=2, node_rank=1, master_addr="node0",
                                                                      master_port=6000), launch.Rendezvous()), "x.py"])
    assert (static.rdzv_backend, get_rdzv_endpoint(static), static.node_rank) == ("static", "node0:6000", 1)


@pytest.mark.parametrize("env,message", [
    ({"RDZV_BACKEND": "c10d", "TORCHRUN_ARGS": "--rdzv-backend static"},
     "RDZV_BACKEND=c10d but TORCHRUN_ARGS has --rdzv-backend static; set only RDZV_BACKEND"),
    ({"RDZV_BACKEND": "etcd"}, "rendezvous backend 'etcd' is not supported; set RDZV_BACKEND=static or c10d"),
    ({"RDZV_ID": "job42"}, "RDZV_ID=job42 is used by c10d rendezvous only"),
    ({"TORCHRUN_ARGS": "--rdzv-backend c10d --master-addr node0"},
     "TORCHRUN_ARGS must not set --master-addr; the launcher sets it from MASTER_ADDR"),
    ({"TORCHRUN_ARGS": "--rdzv_endpoint=node0:29400"},
     "TORCHRUN_ARGS must not set --rdzv-endpoint; the launcher sets it from MASTER_ADDR and MASTER_PORT"),
    ({"TORCHRUN_ARGS": "--nproc_per_node 4"},
     "TORCHRUN_ARGS must not set --nproc-per-node; the launcher sets it from GPUS_PER_NODE"),
    ({"TORCHRUN_ARGS": "--standalone"}, "TORCHRUN_ARGS must not set --standalone"),
    ({"TORCHRUN_ARGS": "--max-restarts 3 --rdzv-backend"}, "TORCHRUN_ARGS ends with --rdzv-backend and no value"),
    ({"TORCHRUN_ARGS": "'unclosed"}, "TORCHRUN_ARGS cannot be split like a command line"),
])
def test_contradictory_rendezvous_settings_are_refused(env, message, te_installed):
    with pytest.raises(ConfigError) as err:
        dry_launch({"NNODES": "2", "MASTER_ADDR": "node0", **env})
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.usefixtures("te_installed")
@pytest.mark.parametrize("env,warned", [
    ({"NNODES": "2"}, "localhost"),
    ({"NNODES": "4", "MASTER_ADDR": "127.0.1.1", "RDZV_BACKEND": "c10d"}, "127.0.1.1"),
    ({"NNODES": "2", "MASTER_ADDR": "node0"}, None),
    ({"NNODES": "1"}, None),
])
def test_several_nodes_on_a_loopback_master_addr_are_warned_about(env, warned):
    _, out, err = dry_launch(env)
    if warned is None:
        assert err == ""
    else:
        assert err == (f"stage2.sh: warning: NNODES={env['NNODES']} but MASTER_ADDR={warned}: nodes other "
                       "than node 0 would connect to themselves; set MASTER_ADDR to the host name of node 0\n")
    assert "warning" not in out


# --------------------------------------------------------------------------- #
# Transformer Engine
# --------------------------------------------------------------------------- #

NO_TE = ("model.spec=te and model.fp8=hybrid need Transformer Engine, which is not installed here; install "
         "transformer-engine[pytorch], or run without it: model.spec=local model.fp8=null")


def test_transformer_engine_is_found_without_importing_it(te_found):
    # This machine's answer, whatever it is, comes from the module search alone (no torch import).
    code = ("import sys; from cumo_megatron import launch; "
            "print(launch.transformer_engine_available(), 'torch' in sys.modules)")
    plain = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, cwd=REPO)
    faked = subprocess.run([sys.executable, "-c", code], env=clean_env(PYTHONPATH=te_found),
                           capture_output=True, text=True, cwd=REPO)
    assert faked.stdout.split() == ["True", "False"], faked.stderr
    try:
        import transformer_engine  # noqa: F401
        installed = True
    except ImportError:
        installed = False
    assert plain.stdout.split() == [str(installed), "False"], plain.stderr


def test_bash_style_refuses_te_configs_without_transformer_engine(monkeypatch):
    monkeypatch.setattr(launch, "transformer_engine_available", lambda: False)
    execs = []
    monkeypatch.setattr(launch.os, "execvpe", lambda *args: execs.append(args))
    for dry in ("1", ""):
        with pytest.raises(ConfigError) as err:
            launch.launch(2, str(SCRIPTS[2]), [], {"DRY_RUN": dry}, io.StringIO(), io.StringIO())
        assert str(err.value) == NO_TE
    with pytest.raises(ConfigError, match=r"^model\.spec=te needs Transformer Engine"):  # stage 1: no FP8
        launch.launch(1, str(SCRIPTS[1]), [], {}, io.StringIO(), io.StringIO())
    assert execs == []

    # The fix it names works: the same launch without Transformer Engine layers goes ahead.
    out = io.StringIO()
    launch.launch(2, str(SCRIPTS[2]), ["model.spec=local", "model.fp8=null"], {}, out, io.StringIO())
    (_, args, _), = execs
    assert args[-2:] == ["model.spec=local", "model.fp8=null"]


def test_bash_style_launches_te_configs_with_transformer_engine(monkeypatch):
    monkeypatch.setattr(launch, "transformer_engine_available", lambda: True)
    execs = []
    monkeypatch.setattr(launch.os, "execvpe", lambda *args: execs.append(args))
    assert launch.launch(2, str(SCRIPTS[2]), [], {}, io.StringIO(), io.StringIO()) == 0
    (_, args, _), = execs
    assert args[-2:] == ["--config", str(config_file(2, "cumo_7b_mistral"))]


@pytest.mark.parametrize("available", [False, True])
def test_python_style_checks_transformer_engine_before_training(monkeypatch, available):
    monkeypatch.setattr(launch, "transformer_engine_available", lambda: available)
    calls = []
    fake = types.ModuleType("cumo_megatron.train")
    fake.main = lambda argv: calls.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "cumo_megatron.train", fake)
    env = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0"}
    if available:
        assert launch.run_rank(3, str(SCRIPTS[3]), [], env, io.StringIO()) == 0
        assert len(calls) == 1
    else:
        with pytest.raises(ConfigError) as err:
            launch.run_rank(3, str(SCRIPTS[3]), [], env, io.StringIO())
        assert str(err.value) == NO_TE and calls == []


def test_refusal_is_one_line_on_stderr(monkeypatch, capsys):
    monkeypatch.setattr(launch, "transformer_engine_available", lambda: False)
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert launch.script_main(3, str(SCRIPTS[3]), ["--launch"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"stage3.sh: error: {NO_TE}\n"


# --------------------------------------------------------------------------- #
# The README's multi-node commands, as written
# --------------------------------------------------------------------------- #


def readme_block(containing: str) -> str:
    """The one ```bash block of examples/README.md that contains ``containing``."""
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S) if containing in b]
    assert len(blocks) == 1, f"{len(blocks)} bash blocks of {README} contain {containing!r}"
    return blocks[0]


def _torchrun_lines(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.startswith(shlex.join(LAUNCHER) + " ")]


def test_readme_bash_style_commands(te_found):
    block = readme_block("RDZV_BACKEND=c10d NNODES=4")
    result = subprocess.run(["bash", "-euc", block], env=clean_env(DRY_RUN="1", PYTHONPATH=te_found, i="2"),
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    one, static, c10d = _torchrun_lines(result.stdout)
    assert _rendezvous_part(one) == ["--node-rank", "0", "--master-addr", "localhost", "--master-port", "29500"]
    assert _rendezvous_part(static) == ["--node-rank", "2", "--master-addr", "node0", "--master-port", "29500"]
    assert _rendezvous_part(c10d) == ["--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29500",
                                      "--rdzv-id", "cumo-stage3"]
    assert _training_part(static) == _training_part(c10d)  # the same training, however they meet
    assert result.stderr == ""  # MASTER_ADDR names node 0: no loopback warning


FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for srun: one task per node only with --ntasks-per-node=1, run one after another
# with the variables SLURM gives each task.
[[ " $* " == *" --ntasks-per-node=1 "* ]] || { echo "srun: expected --ntasks-per-node=1" >&2; exit 9; }
while [[ $1 == --* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURMD_NODENAME=node$node "$@" || exit
done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || exit 9
for ((node = 0; node < SLURM_NNODES; node++)); do echo node$node; done
"""


def test_readme_slurm_command_starts_one_launcher_per_node(tmp_path, te_found):
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = clean_env(DRY_RUN="1", PYTHONPATH=te_found, SLURM_NNODES="4", SLURM_JOB_NODELIST="node[0-3]",
                    SLURM_JOB_ID="777", PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euc", readme_block("srun ")], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    commands = _torchrun_lines(result.stdout)
    assert [_rendezvous_part(c) for c in commands] == [
        ["--node-rank", str(node), "--master-addr", "node0", "--master-port", "29500"] for node in range(4)]
    assert all(c[c.index("--nnodes") + 1] == "4" and c[c.index("--nproc-per-node") + 1] == "8" for c in commands)
    assert all(f"# node {node} of 4: stage 3: world 32" in result.stdout for node in range(4))
    assert "warning" not in result.stderr  # MASTER_ADDR came out as node 0's name
