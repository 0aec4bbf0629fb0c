"""The example launchers (examples/stage{1,2,3}.sh, cumo_megatron/launch.py) and their configs.

Checked without a GPU and without training: every config loads, carries the reference
hyper-parameters and fits the worlds it is meant for; each script parses as bash and as Python;
bash style prints the exact torchrun command, Python style the exact `cumo_megatron.train.main`
argv (dry runs); the non-dry paths exec torchrun / call the trainer (both replaced by recorders).
"""

from __future__ import annotations

import ast
import io
import os
import shlex
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

from cumo_megatron import launch
from cumo_megatron.config.loader import ConfigError, load_config
from cumo_megatron.config.schema import ExperimentConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CONFIGS = EXAMPLES / "configs"
SCRIPTS = {stage: EXAMPLES / f"stage{stage}.sh" for stage in (1, 2, 3)}
MODELS = {"cumo-7b-mistral": "cumo_7b_mistral", "cumo-7b-vicuna": "cumo_7b_vicuna", "cumo-8x7b": "cumo_8x7b"}

# Worlds (NNODES x 8 GPUs) each model's layout is meant for, per examples/README.md.
WORLDS = {"cumo_7b_mistral": (8, 16, 32, 64), "cumo_7b_vicuna": (8, 16, 32, 64), "cumo_8x7b": (32, 64)}
# DESIGN section 1: (lr, global batch, max length); CuMo-8x7B's stage 3 uses the released 2e-6.
REFERENCE = {1: (1e-3, 256, 2048), 2: (2e-6, 128, 4096), 3: (4e-6, 256, 4096)}
TEMPLATES = {"cumo_7b_mistral": "mistral_instruct", "cumo_7b_vicuna": "vicuna_v1", "cumo_8x7b": "mistral_instruct"}
# Variables the launcher reads: cleared from the environment the scripts run in, so the
# developer's shell cannot leak into the results.
LAUNCH_VARIABLES = (
    "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "MODEL", "CONFIG",
    "DATA_JSON", "EVAL_JSON", "IMAGE_FOLDER", "TOKENIZER", "CKPT_DIR", "LOAD", "SAVE", "EXTRA_ARGS",
    "TORCHRUN", "TORCHRUN_ARGS", "RDZV_BACKEND", "RDZV_ID", "DRY_RUN", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
    "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_AVOID_RECORD_STREAMS",
)


def config_file(stage: int, model: str) -> Path:
    """The config a stage script picks for ``model`` (underscore name)."""
    return CONFIGS / f"stage{stage}_{model}.yaml"


# The command bash style runs by default: torchrun through cumo_megatron.torchrun, with the
# Python that runs the launcher (clean_env hands the scripts this test's interpreter).
LAUNCHER = [sys.executable, "-m", "cumo_megatron.torchrun"]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without launcher variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["PYTHON"] = sys.executable  # the bash part hands over to this interpreter
    env.update(extra)
    return env


def run_script(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a launcher from a directory outside the repository (paths must not depend on cwd)."""
    return subprocess.run(args, env=env, cwd="/", capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- #
# (a) configs
# --------------------------------------------------------------------------- #


def test_every_stage_and_model_has_a_config():
    found = {p.name for p in CONFIGS.glob("stage*_*.yaml")}
    assert found == {f"stage{s}_{m}.yaml" for s in (1, 2, 3) for m in MODELS.values()}


@pytest.mark.parametrize("model", sorted(WORLDS))
@pytest.mark.parametrize("stage", (1, 2, 3))
def test_config_loads_with_reference_settings_and_fits_its_worlds(stage, model):
    cfg = load_config(ExperimentConfig, config_file(stage, model))
    train, data, m, par = cfg.train, cfg.data, cfg.model, cfg.parallel

    lr, batch, max_length = REFERENCE[stage]
    if (stage, model) == (3, "cumo_8x7b"):
        lr = 2e-6
    assert train.stage == stage
    assert train.lr == pytest.approx(lr, rel=0, abs=0)
    assert (train.global_batch_size, data.max_length) == (batch, max_length)
    assert (train.warmup_fraction, train.weight_decay, train.min_lr, train.epochs) == (0.03, 0.0, 0.0, 1)
    assert data.template == ("plain" if stage == 1 else TEMPLATES[model])
    assert data.aspect == ("crop" if stage == 1 else "pad")
    assert data.files and data.image_folder and data.tokenizer

    # How a user runs it on H100 nodes.
    assert (m.precision, m.spec) == ("bf16", "te")
    assert train.distributed_optimizer is True
    assert m.recompute == ("selective" if stage == 1 else "full")
    assert m.fp8 == (None if stage == 1 else "hybrid")
    assert par.tp == 2 and par.use_sequence_parallel

    # CuMo's architecture: CLIP-L/336 penultimate + S2; dense vision side until stage 3.
    assert (m.vision.built_layers, m.vision.s2_scales, m.vision.feature_channels) == (23, [1, 3], 2048)
    for moe in (m.vision.moe, m.connector.moe):
        if stage < 3:
            assert moe is None
        else:
            assert (moe.num_experts, moe.top_k, moe.balance_coeff, moe.z_loss_coeff) == (4, 2, 0.1, 0.01)
    if model == "cumo_8x7b":
        assert (m.language.arch, m.language.moe.num_experts, m.language.moe.top_k) == ("mixtral", 8, 2)
        assert (par.pp, par.ep, par.etp) == (4, 8, 1)
    else:
        assert m.language.moe is None and (par.pp, par.ep) == (1, 1)

    for world in WORLDS[model]:
        layout = launch.world_layout(cfg, world)
        assert layout.dp * par.tp * par.pp == world
        assert layout.num_microbatches * train.micro_batch_size * layout.dp == batch


def test_world_layout_names_what_does_not_fit():
    mixtral = load_config(ExperimentConfig, config_file(3, "cumo_8x7b"))
    assert launch.smallest_world(mixtral) == 32
    with pytest.raises(ConfigError, match=r"world size 8 \(NNODES=1 x GPUS_PER_NODE=8\).*etp\*ep\*pp = 1\*8\*4.*multiple of 32"):
        launch.world_layout(mixtral, 8, "NNODES=1 x GPUS_PER_NODE=8")
    assert launch.world_layout(mixtral, 64).expert_dp == 2

    dense = load_config(ExperimentConfig, config_file(1, "cumo_7b_mistral"))
    with pytest.raises(ConfigError, match=r"tp\*pp = 2\*1"):
        launch.world_layout(dense, 9)
    # 16 nodes: DP 64, 256 / 64 = 4 samples per rank, so micro-batch 8 cannot fit.
    with pytest.raises(ConfigError, match=r"global_batch_size=256 .* 8\*64 .* train\.micro_batch_size=4"):
        launch.world_layout(dense, 128)


# --------------------------------------------------------------------------- #
# (b) one file, two languages
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("stage", (1, 2, 3))
def test_script_is_valid_bash_and_valid_python(stage):
    path = SCRIPTS[stage]
    assert os.access(path, os.X_OK), f"{path} must be executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr

    source = path.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. an invalid escape sequence in the bash lines
        code = compile(source, str(path), "exec")
    # Imported rather than run (as a multiprocessing child re-imports it): defines, starts nothing.
    namespace = {"__name__": "__mp_main__", "__file__": str(path)}
    exec(code, namespace)
    assert namespace["STAGE"] == stage
    # To Python the bash lines are the docstring, and the exec is in it.
    assert 'exec "${PYTHON:-python3}" "$0" --launch "$@"' in namespace["__doc__"]


# --------------------------------------------------------------------------- #
# (c) bash style: the torchrun command
# --------------------------------------------------------------------------- #


def _torchrun_line(stdout: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith(shlex.join(LAUNCHER) + " ")]
    assert len(lines) == 1, stdout
    return shlex.split(lines[0])


def test_bash_style_dry_run_prints_the_multi_node_torchrun_command(te_found):
    env = clean_env(
        DRY_RUN="1", PYTHONPATH=te_found, NNODES="4", NODE_RANK="2", MASTER_ADDR="node0.cluster", MASTER_PORT="6001",
        GPUS_PER_NODE="8", MODEL="cumo-8x7b",
        DATA_JSON="/data/a.json, /data/b b.jsonl:0.5", IMAGE_FOLDER="/data/images", TOKENIZER="/hf/mixtral",
        CKPT_DIR="/ckpt/x", EXTRA_ARGS="train.train_steps=10 'train.save_interval=5'",
    )
    result = run_script(["bash", str(SCRIPTS[3]), "train.lr=1e-5"], env)
    assert result.returncode == 0, result.stderr
    config = str(config_file(3, "cumo_8x7b"))
    overrides = [
        'data.files=["/data/a.json", "/data/b b.jsonl:0.5"]', "data.image_folder=/data/images",
        "data.tokenizer=/hf/mixtral", "train.load=/ckpt/x/stage2", "train.save=/ckpt/x/stage3",
        "train.train_steps=10", "train.save_interval=5", "train.lr=1e-5",
    ]
    assert _torchrun_line(result.stdout) == [
        *LAUNCHER, "--nnodes", "4", "--nproc-per-node", "8", "--node-rank", "2",
        "--master-addr", "node0.cluster", "--master-port", "6001",
        "-m", "cumo_megatron.train", "--config", config, *overrides,
    ]
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in result.stdout
    assert "world 32 = tp 2 x pp 4 x dp 4" in result.stdout

    # The overrides mean what the variables said.
    cfg = load_config(ExperimentConfig, config, overrides)
    assert cfg.data.files == ["/data/a.json", "/data/b b.jsonl:0.5"]
    assert (cfg.data.image_folder, cfg.data.tokenizer) == ("/data/images", "/hf/mixtral")
    assert (cfg.train.load, cfg.train.save) == ("/ckpt/x/stage2", "/ckpt/x/stage3")
    assert (cfg.train.train_steps, cfg.train.save_interval, cfg.train.lr) == (10, 5, 1e-5)


def test_bash_style_defaults_and_refusals(te_found):
    result = run_script(["bash", str(SCRIPTS[1])], clean_env(DRY_RUN="1", PYTHONPATH=te_found))
    assert result.returncode == 0, result.stderr
    assert _torchrun_line(result.stdout) == [
        *LAUNCHER, "--nnodes", "1", "--nproc-per-node", "8", "--node-rank", "0",
        "--master-addr", "localhost", "--master-port", "29500",
        "-m", "cumo_megatron.train", "--config", str(config_file(1, "cumo_7b_mistral")),
    ]

    # CuMo-8x7B does not fit one node: refused before torchrun (TORCHRUN=false would fail loudly).
    refused = run_script(["bash", str(SCRIPTS[2])], clean_env(MODEL="cumo-8x7b", TORCHRUN="false"))
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr.strip().startswith("stage2.sh: error: world size 8 (NNODES=1 x GPUS_PER_NODE=8)")
    assert len(refused.stderr.strip().splitlines()) == 1


def test_bash_style_execs_torchrun_with_the_rank_environment(monkeypatch, te_installed):
    calls = []
    monkeypatch.setattr(launch.os, "execvpe", lambda file, args, env: calls.append((file, args, env)))
    out = io.StringIO()
    env = {"NNODES": "2", "NODE_RANK": "1", "MODEL": "cumo-7b-vicuna", "CUDA_DEVICE_MAX_CONNECTIONS": "8",
           "TORCHRUN": "python -m torch.distributed.run", "TORCHRUN_ARGS": "--max-restarts 2"}
    assert launch.launch(2, str(SCRIPTS[2]), ["train.micro_batch_size=1"], env, out) == 0
    (file, args, rank_env), = calls
    assert file == "python" and args == _printed_command(out.getvalue())
    assert args[:4] == ["python", "-m", "torch.distributed.run", "--nnodes"]
    assert args[args.index("--master-port") + 2:args.index("-m", 4)] == ["--max-restarts", "2"]
    assert args[-3:] == ["--config", str(config_file(2, "cumo_7b_vicuna")), "train.micro_batch_size=1"]
    assert rank_env["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"  # the user's value wins
    assert rank_env["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert str(REPO) in rank_env["PYTHONPATH"].split(os.pathsep)
    assert "export PYTHONPATH=" in out.getvalue() and "CUDA_DEVICE_MAX_CONNECTIONS=" not in out.getvalue()


def _printed_command(stdout: str) -> list[str]:
    return shlex.split(stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- #
# (d) Python style: this rank's trainer argv
# --------------------------------------------------------------------------- #


def _train_argv(stdout: str) -> list[str]:
    prefix = "cumo_megatron.train.main("
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stdout
    return ast.literal_eval(lines[0][len(prefix):-1])


@pytest.mark.parametrize("stage,model,world", [(1, "cumo-7b-vicuna", 16), (2, "cumo-7b-mistral", 8),
                                               (3, "cumo-8x7b", 32)])
def test_python_style_dry_run_prints_the_trainer_argv(stage, model, world, te_found):
    # As torchrun starts each rank; NNODES=1 is ignored in this style (torchrun's world wins).
    env = clean_env(
        DRY_RUN="1", PYTHONPATH=te_found, RANK="5", WORLD_SIZE=str(world), LOCAL_RANK="5", LOCAL_WORLD_SIZE="8",
        MASTER_ADDR="node0", MASTER_PORT="29500", NNODES="1", MODEL=model,
        IMAGE_FOLDER="/data/images", LOAD="/ckpt/in", EXTRA_ARGS="train.log_interval=1",
    )
    result = run_script([sys.executable, str(SCRIPTS[stage]), "train.train_steps=3"], env)
    assert result.returncode == 0, result.stderr
    assert _train_argv(result.stdout) == [
        "--config", str(config_file(stage, MODELS[model])), "data.image_folder=/data/images",
        "train.load=/ckpt/in", "train.log_interval=1", "train.train_steps=3",
    ]
    assert f"# rank 5 of {world} (local rank 5)" in result.stdout


def test_python_style_calls_the_trainer(monkeypatch, te_installed):
    calls = []
    fake = types.ModuleType("cumo_megatron.train")
    fake.main = lambda argv: calls.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "cumo_megatron.train", fake)
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "SAVE": "runs/x"}
    assert launch.run_rank(3, str(SCRIPTS[3]), ["seed=7"], env, io.StringIO()) == 0
    assert calls == [["--config", str(config_file(3, "cumo_7b_mistral")), "train.save=runs/x", "seed=7"]]
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # set before the trainer imports torch

    fake.main = lambda argv: 3  # the trainer's exit status comes back out
    assert launch.run_rank(3, str(SCRIPTS[3]), [], env, io.StringIO()) == 3
    # Without torchrun the world is one process, which a TP=2 config cannot use.
    with pytest.raises(ConfigError, match="no WORLD_SIZE: start this file with torchrun"):
        launch.run_rank(3, str(SCRIPTS[3]), [], {}, io.StringIO())


# --------------------------------------------------------------------------- #
# Environment handling
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("env,argv,message", [
    ({"NNODES": "two"}, [], "NNODES='two' is not an integer"),
    ({"NNODES": "2", "NODE_RANK": "2"}, [], "NODE_RANK=2 must be below NNODES=2"),
    ({"MASTER_PORT": "70000"}, [], "MASTER_PORT=70000 is not a TCP port"),
    ({"MODEL": "cumo-13b"}, [], "MODEL='cumo-13b' is unknown; choose one of cumo-7b-mistral"),
    ({"CONFIG": "/nonexistent.yaml"}, [], "CONFIG=/nonexistent.yaml: no such file"),
    ({"CONFIG": str(CONFIGS / "stage2_cumo_7b_mistral.yaml")}, [], "sets train.stage=2, but this is the stage-3"),
    ({"EXTRA_ARGS": "--lr 1"}, [], "EXTRA_ARGS: '--lr' is not a dotted.key=value override"),
    ({}, ["--config", "x.yaml"], "command line: '--config' is not a dotted.key=value override"),
    ({}, ["train.lr=fast"], "train.lr: expected float"),
    ({"DATA_JSON": "a.json,,b.json"}, [], "DATA_JSON='a.json,,b.json' has an empty entry"),
])
def test_launch_rejects_bad_settings_with_the_name_to_fix(env, argv, message):
    with pytest.raises(ConfigError) as err:
        launch.launch(3, str(SCRIPTS[3]), argv, {"DRY_RUN": "1", **env}, io.StringIO())
    assert message in str(err.value)


def test_checkpoint_folders_chain_the_stages():
    for stage, load in ((1, "/c/init"), (2, "/c/stage1"), (3, "/c/stage2")):
        assert launch.env_overrides(stage, {"CKPT_DIR": "/c"}) == [
            f"train.load={load}", f"train.save=/c/stage{stage}"]
    assert launch.env_overrides(3, {"CKPT_DIR": "/c", "LOAD": "/up"}) == ["train.load=/up", "train.save=/c/stage3"]


@pytest.mark.parametrize("value", ["/data/images", "yes", "123", "null", "a: b", "[x]", "#x", "it's", 'say "hi"'])
def test_path_values_reach_the_config_unchanged(value):
    overrides = launch.env_overrides(1, {"IMAGE_FOLDER": value, "DATA_JSON": value})
    cfg = load_config(ExperimentConfig, config_file(1, "cumo_7b_mistral"), overrides)
    assert cfg.data.image_folder == value
    assert cfg.data.files == [value]
