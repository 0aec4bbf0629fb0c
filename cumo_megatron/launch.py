"""Launch the example recipes (``examples/stage{1,2,3}.sh``) on one node or many.

The stage scripts are files that are both bash and Python (see their header). Whichever way they are
started, they end up here, and everything a user sets comes from the environment:

- **bash style** (``bash examples/stage3.sh [overrides]`` on every node): `launch` resolves the YAML
  config, checks that it fits ``NNODES * GPUS_PER_NODE`` GPUs, and ``exec``s
  ``torchrun --nnodes .. --nproc-per-node .. RENDEZVOUS -m cumo_megatron.train --config FILE
  overrides..``, where RENDEZVOUS is ``--node-rank .. --master-addr .. --master-port ..`` (static,
  the default) or ``--rdzv-backend c10d --rdzv-endpoint MASTER_ADDR:MASTER_PORT --rdzv-id ..``
  (``RDZV_BACKEND=c10d``: torchrun ignores the static flags under c10d, and without an endpoint
  every node would meet only itself on localhost);
- **Python style** (``torchrun ... examples/stage3.sh [overrides]``: torchrun hands the file to
  ``python`` once per rank): `run_rank` resolves the same config and overrides, checks them against
  torchrun's ``WORLD_SIZE``, and calls ``cumo_megatron.train.main(["--config", FILE, *overrides])``.

Environment (all optional):

==================  ===========================================================================
``NNODES``          nodes in the job (1); bash style only, torchrun's own flags win in Python style
``NODE_RANK``       this node's index, 0 .. NNODES-1 (0); bash style only
``MASTER_ADDR``     host of node 0 (localhost); bash style only
``MASTER_PORT``     rendezvous port on MASTER_ADDR (29500); bash style only
``GPUS_PER_NODE``   processes per node (8); bash style only
``RDZV_BACKEND``    ``static`` (default) or ``c10d``; ``--rdzv-backend`` in TORCHRUN_ARGS means the
                    same (the two must agree); bash style only
``RDZV_ID``         c10d job id, the same on every node (``cumo-stage{N}``); bash style only
``TORCHRUN``        the launcher command (``python -m cumo_megatron.torchrun`` with this Python:
                    torchrun that exits with the failed rank's status, without a launcher
                    traceback); ``TORCHRUN_ARGS``: extra launcher flags, not those the launcher
                    sets (`OWNED_FLAGS`)
``MODEL``           ``cumo-7b-mistral`` (default), ``cumo-7b-vicuna`` or ``cumo-8x7b``: picks
                    ``configs/stage{N}_{model}.yaml`` beside the script
``CONFIG``          a YAML file to use instead (any path)
``DATA_JSON``       training data, comma-separated ``path[:weight]`` -> ``data.files``
``EVAL_JSON``       evaluation data, comma-separated -> ``data.eval_files``
``IMAGE_FOLDER``    -> ``data.image_folder``;  ``TOKENIZER`` -> ``data.tokenizer``
``CKPT_DIR``        one folder for a model's whole pipeline: stage N saves to ``CKPT_DIR/stageN``
                    and loads ``CKPT_DIR/stage{N-1}`` (stage 1 loads ``CKPT_DIR/init``)
``LOAD``, ``SAVE``  -> ``train.load`` / ``train.save`` (win over ``CKPT_DIR``)
``EXTRA_ARGS``      more ``dotted.key=value`` overrides (shell-quoted, split like a command line)
``DRY_RUN``         1: print what would run (bash: the torchrun command; Python: the trainer's
                    argv) and exit 0 without starting anything
==================  ===========================================================================

Overrides apply in this order, later winning: the YAML file, the path variables above,
``EXTRA_ARGS``, then the script's own command-line arguments.

Before anything starts, both styles refuse a config that needs Transformer Engine
(``model.spec=te``, ``model.fp8``) where ``transformer_engine`` cannot be imported, and bash style
warns on stderr when ``NNODES > 1`` meets on a loopback ``MASTER_ADDR``. The multi-node and SLURM
commands of ``examples/README.md`` are the ones ``tests/examples`` runs.

This module imports no torch: a dry run or a rejected layout costs well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, TextIO

import yaml

from cumo_megatron.config.loader import ConfigError, load_config
from cumo_megatron.config.schema import ExperimentConfig

MODELS = ("cumo-7b-mistral", "cumo-7b-vicuna", "cumo-8x7b")
DEFAULT_MODEL = "cumo-7b-mistral"
STAGES = (1, 2, 3)
TRAIN_MODULE = "cumo_megatron.train"
# torch's torchrun, ending a failed job with the rank's exit status and no launcher traceback
# (cumo_megatron/torchrun.py); run by the Python running this launcher, which has torch.
TORCHRUN_MODULE = "cumo_megatron.torchrun"

# Process environment every rank of a GPU run wants, set unless the user already set it.
# CUDA_DEVICE_MAX_CONNECTIONS=1 keeps megatron's TP/SP communication kernels queued in issue
# order so they overlap with compute as scheduled; it must be set before CUDA starts.
# TORCH_NCCL_AVOID_RECORD_STREAMS=1 frees NCCL buffers promptly (megatron's recommendation).
RANK_ENV_DEFAULTS = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
}

# (environment variable, dotted config key, is a comma-separated list)
PATH_VARIABLES = (
    ("DATA_JSON", "data.files", True),
    ("EVAL_JSON", "data.eval_files", True),
    ("IMAGE_FOLDER", "data.image_folder", False),
    ("TOKENIZER", "data.tokenizer", False),
)

_TRUE = {"1", "true", "yes", "on"}


class LaunchError(ConfigError):
    """The environment or the command line of a launch is wrong (names the variable to fix)."""


# --------------------------------------------------------------------------- #
# Environment
# --------------------------------------------------------------------------- #


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    """Integer ``env[name]`` (``default`` when unset or empty), at least ``minimum``."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise LaunchError(f"{name}={value} must be >= {minimum}")
    return value


def dry_run(env: Mapping[str, str]) -> bool:
    """Whether ``DRY_RUN`` asks to print instead of run."""
    return env.get("DRY_RUN", "").strip().lower() in _TRUE


@dataclass(frozen=True)
class Nodes:
    """Where this node sits in a multi-node job (bash style)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "localhost"
    master_port: int = 29500
    gpus_per_node: int = 8

    @property
    def world_size(self) -> int:
        """Total processes in the job."""
        return self.nnodes * self.gpus_per_node

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Nodes":
        """Read ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``GPUS_PER_NODE``."""
        nodes = cls(
            nnodes=env_int(env, "NNODES", 1, minimum=1),
            node_rank=env_int(env, "NODE_RANK", 0),
            master_addr=env.get("MASTER_ADDR", "").strip() or "localhost",
            master_port=env_int(env, "MASTER_PORT", 29500, minimum=1),
            gpus_per_node=env_int(env, "GPUS_PER_NODE", 8, minimum=1),
        )
        if nodes.node_rank >= nodes.nnodes:
            raise LaunchError(f"NODE_RANK={nodes.node_rank} must be below NNODES={nodes.nnodes}")
        if nodes.master_port > 65535:
            raise LaunchError(f"MASTER_PORT={nodes.master_port} is not a TCP port")
        return nodes


RDZV_BACKENDS = ("static", "c10d")
# torchrun flags the launcher derives from NNODES, GPUS_PER_NODE, NODE_RANK, MASTER_ADDR,
# MASTER_PORT and RDZV_ID (canonical spelling -> the variable to set instead): a second copy in
# TORCHRUN_ARGS would silently win over them (argparse keeps the last one).
OWNED_FLAGS = {
    "--nnodes": "NNODES",
    "--nproc-per-node": "GPUS_PER_NODE",
    "--node-rank": "NODE_RANK",
    "--master-addr": "MASTER_ADDR",
    "--master-port": "MASTER_PORT",
    "--rdzv-endpoint": "MASTER_ADDR and MASTER_PORT",
    "--rdzv-id": "RDZV_ID",
    "--standalone": "NNODES=1 (the default)",
}
_LOOPBACK = {"localhost", "::1", "[::1]"}


def _flag_name(arg: str) -> str:
    """``--rdzv_backend=c10d`` -> ``--rdzv-backend`` (torchrun takes both spellings, ``=`` or not)."""
    return "--" + arg[2:].split("=", 1)[0].replace("_", "-")


@dataclass(frozen=True)
class Rendezvous:
    """How this job's nodes meet (bash style), and the other TORCHRUN_ARGS flags."""

    backend: str = "static"
    run_id: str = ""  # c10d only: the same on every node of one job
    torchrun_args: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str], stage: int) -> "Rendezvous":
        """Read ``RDZV_BACKEND``, ``RDZV_ID`` and ``TORCHRUN_ARGS`` (which may name the backend).

        ``--rdzv-backend`` in TORCHRUN_ARGS counts as RDZV_BACKEND (the two must agree) and is
        moved out of the extra flags; flags the launcher sets itself are refused there. The
        default id, ``cumo-stage{N}``, is the same on every node.
        """
        try:
            args = shlex.split(env.get("TORCHRUN_ARGS", ""))
        except ValueError as err:
            raise LaunchError(f"TORCHRUN_ARGS cannot be split like a command line: {err}") from None
        from_args, rest = _take_backend(args)
        from_env = env.get("RDZV_BACKEND", "").strip()
        if from_env and from_args and from_env != from_args:
            raise LaunchError(
                f"RDZV_BACKEND={from_env} but TORCHRUN_ARGS has --rdzv-backend {from_args}; "
                "set only RDZV_BACKEND"
            )
        backend = from_env or from_args or "static"
        if backend not in RDZV_BACKENDS:
            raise LaunchError(
                f"rendezvous backend {backend!r} is not supported; set RDZV_BACKEND=static or c10d"
            )
        run_id = env.get("RDZV_ID", "").strip()
        if run_id and backend == "static":
            raise LaunchError(
                f"RDZV_ID={run_id} is used by c10d rendezvous only; set RDZV_BACKEND=c10d or unset RDZV_ID"
            )
        return cls(backend=backend, run_id=run_id or f"cumo-stage{stage}", torchrun_args=tuple(rest))


def _take_backend(args: Sequence[str]) -> tuple[str, list[str]]:
    """(the ``--rdzv-backend`` value in ``args`` or "", the other args); refuses `OWNED_FLAGS`."""
    backend, rest, i = "", [], 0
    while i < len(args):
        arg = args[i]
        name = _flag_name(arg) if arg.startswith("--") else ""
        if name in OWNED_FLAGS:
            raise LaunchError(
                f"TORCHRUN_ARGS must not set {name}; the launcher sets it from {OWNED_FLAGS[name]}"
            )
        if name != "--rdzv-backend":
            rest.append(arg)
        elif "=" in arg:
            backend = arg.split("=", 1)[1]
        elif i + 1 < len(args):
            i += 1
            backend = args[i]
        else:
            raise LaunchError(
                "TORCHRUN_ARGS ends with --rdzv-backend and no value; set RDZV_BACKEND=c10d instead"
            )
        i += 1
    return backend, rest


def rendezvous_flags(nodes: Nodes, rdzv: Rendezvous) -> list[str]:
    """torchrun flags that make ``nodes.nnodes`` launchers on different hosts form one job.

    Static (torchrun's default): node ``NODE_RANK`` joins the store on MASTER_ADDR:MASTER_PORT.
    c10d: torchrun ignores --master-addr/--master-port/--node-rank and, without
    --rdzv-endpoint, meets on localhost:29400, i.e. every node alone; so the endpoint is
    MASTER_ADDR:MASTER_PORT and node ranks are assigned as the nodes arrive.
    """
    if rdzv.backend == "static":
        return ["--node-rank", str(nodes.node_rank), "--master-addr", nodes.master_addr,
                "--master-port", str(nodes.master_port)]
    host = nodes.master_addr
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6: host:port needs the brackets
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host}:{nodes.master_port}",
            "--rdzv-id", rdzv.run_id]


def loopback_warning(nodes: Nodes) -> Optional[str]:
    """A warning when several nodes would meet on a loopback MASTER_ADDR (each on itself)."""
    addr = nodes.master_addr
    if nodes.nnodes == 1 or not (addr in _LOOPBACK or addr.startswith("127.")):
        return None
    return (
        f"warning: NNODES={nodes.nnodes} but MASTER_ADDR={addr}: nodes other than node 0 would "
        "connect to themselves; set MASTER_ADDR to the host name of node 0"
    )


# --------------------------------------------------------------------------- #
# Transformer Engine
# --------------------------------------------------------------------------- #


def transformer_engine_available() -> bool:
    """Whether ``transformer_engine`` can be imported here (found, not imported: no torch)."""
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


def check_transformer_engine(cfg: ExperimentConfig) -> None:
    """Refuse a config that needs Transformer Engine where it is not installed.

    Otherwise every rank would start, import torch and megatron, then die on the same ImportError.
    """
    needs = [f"model.spec={cfg.model.spec}"] if cfg.model.spec == "te" else []
    if cfg.model.fp8:
        needs.append(f"model.fp8={cfg.model.fp8}")
    if needs and not transformer_engine_available():
        verb = "needs" if len(needs) == 1 else "need"
        raise LaunchError(
            f"{' and '.join(needs)} {verb} Transformer Engine, which is not installed here; "
            "install transformer-engine[pytorch], or run without it: model.spec=local model.fp8=null"
        )


# --------------------------------------------------------------------------- #
# Config file and overrides
# --------------------------------------------------------------------------- #


def config_path(stage: int, script: str, env: Mapping[str, str]) -> str:
    """Absolute path of the YAML config: ``CONFIG``, else ``configs/stage{N}_{MODEL}.yaml``.

    Absolute, so the command is the same on every node whatever directory it starts from (the
    checkout must sit at the same path on every node, as with any multi-node launch).
    """
    if stage not in STAGES:
        raise LaunchError(f"stage {stage} is unknown; choose 1, 2 or 3")
    custom = env.get("CONFIG", "").strip()
    if custom:
        path = os.path.abspath(custom)
        if not os.path.isfile(path):
            raise LaunchError(f"CONFIG={custom}: no such file")
        return path
    model = env.get("MODEL", "").strip() or DEFAULT_MODEL
    if model not in MODELS:
        raise LaunchError(
            f"MODEL={model!r} is unknown; choose one of {', '.join(MODELS)} (or set CONFIG)"
        )
    configs = os.path.join(os.path.dirname(os.path.abspath(script)), "configs")
    path = os.path.join(configs, f"stage{stage}_{model.replace('-', '_')}.yaml")
    if not os.path.isfile(path):
        raise LaunchError(f"no config for MODEL={model} stage {stage}: {path} is missing")
    return path


def _yaml_value(value: str) -> str:
    """``value`` written so the config loader (YAML) reads back exactly this string.

    Plain when YAML already reads it as itself (``/data/images``), JSON-quoted otherwise
    (``"yes"``, ``"123"``, ``"a: b"``): JSON strings are YAML strings.
    """
    try:
        if yaml.safe_load(value) == value and "\n" not in value:
            return value
    except yaml.YAMLError:
        pass
    return json.dumps(value)


def _split_list(name: str, raw: str) -> list[str]:
    items = [item.strip() for item in raw.split(",")]
    if not all(items):
        raise LaunchError(f"{name}={raw!r} has an empty entry; use comma-separated paths")
    return items


def env_overrides(stage: int, env: Mapping[str, str]) -> list[str]:
    """``dotted.key=value`` overrides from the path variables, ``CKPT_DIR``, ``LOAD``/``SAVE``
    and ``EXTRA_ARGS``, in that order."""
    overrides = []
    for name, key, is_list in PATH_VARIABLES:
        raw = env.get(name, "").strip()
        if not raw:
            continue
        if is_list:
            overrides.append(f"{key}={json.dumps(_split_list(name, raw))}")
        else:
            overrides.append(f"{key}={_yaml_value(raw)}")
    load, save = env.get("LOAD", "").strip(), env.get("SAVE", "").strip()
    ckpt_dir = env.get("CKPT_DIR", "").strip()
    if ckpt_dir:
        previous = "init" if stage == 1 else f"stage{stage - 1}"
        load = load or os.path.join(ckpt_dir, previous)
        save = save or os.path.join(ckpt_dir, f"stage{stage}")
    if load:
        overrides.append(f"train.load={_yaml_value(load)}")
    if save:
        overrides.append(f"train.save={_yaml_value(save)}")
    try:
        extra = shlex.split(env.get("EXTRA_ARGS", ""))
    except ValueError as err:
        raise LaunchError(f"EXTRA_ARGS cannot be split like a command line: {err}") from None
    return overrides + check_overrides(extra, "EXTRA_ARGS")


def check_overrides(args: Sequence[str], where: str) -> list[str]:
    """Reject anything but ``dotted.key=value`` with a message that says what to do instead."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            raise LaunchError(
                f"{where}: {arg!r} is not a dotted.key=value override; the stage scripts take "
                "overrides only (set CONFIG=FILE for another config, TORCHRUN_ARGS for torchrun flags)"
            )
    return list(args)


def train_argv(config: str, overrides: Sequence[str]) -> list[str]:
    """Arguments of ``python -m cumo_megatron.train`` (and of ``cumo_megatron.train.main``)."""
    return ["--config", config, *overrides]


# --------------------------------------------------------------------------- #
# Parallel layout against the world size
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class WorldLayout:
    """How a config's parallel layout fills ``world_size`` processes."""

    world_size: int
    dp: int  # data-parallel size of the dense part
    expert_dp: int  # data-parallel size of the experts (world / (etp * ep * pp))
    num_microbatches: int  # per global batch, per data-parallel rank


def smallest_world(cfg: ExperimentConfig) -> int:
    """Smallest world size the layout divides: lcm(tp*pp, etp*ep*pp)."""
    par = cfg.parallel
    return math.lcm(par.tp * par.pp, (par.etp or par.tp) * par.ep * par.pp)


def world_layout(cfg: ExperimentConfig, world_size: int, source: str = "") -> WorldLayout:
    """Check that ``cfg`` fits ``world_size`` processes; raise `ConfigError` naming what to change.

    Mirrors `cumo_megatron.platform.ParallelSizes.data_parallel_size` (which needs torch) and
    megatron's micro-batch calculator: the world must be a multiple of tp*pp (dense part) and of
    etp*ep*pp (experts; etp defaults to tp), and the global batch a multiple of micro batch * DP.
    ``source`` says in the messages where the world size came from (``NNODES=1 x GPUS_PER_NODE=8``).
    """
    par, train = cfg.parallel, cfg.train
    etp = par.etp or par.tp
    world = f"world size {world_size}" + (f" ({source})" if source else "")
    smallest = smallest_world(cfg)
    for size, what in ((par.tp * par.pp, f"tp*pp = {par.tp}*{par.pp}"),
                       (etp * par.ep * par.pp, f"etp*ep*pp = {etp}*{par.ep}*{par.pp}")):
        if world_size % size:
            raise ConfigError(
                f"{world} is not divisible by {what} (parallel.*); this layout needs a multiple "
                f"of {smallest} processes"
            )
    dp = world_size // (par.tp * par.pp)
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        fits = [m for m in range(train.micro_batch_size, 0, -1)
                if train.global_batch_size % (m * dp) == 0]
        advice = f"e.g. train.micro_batch_size={fits[0]}" if fits else "change the number of processes"
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"train.micro_batch_size*DP = {train.micro_batch_size}*{dp} with {world}; {advice}"
        )
    return WorldLayout(
        world_size=world_size,
        dp=dp,
        expert_dp=world_size // (etp * par.ep * par.pp),
        num_microbatches=train.global_batch_size // per_step,
    )


def describe(cfg: ExperimentConfig, layout: WorldLayout) -> str:
    """One line for logs: the layout a run will use."""
    par, model = cfg.parallel, cfg.model
    experts = ""
    if par.ep > 1 or model.language.moe is not None:
        experts = f"; experts: ep {par.ep} x etp {par.etp or par.tp} x edp {layout.expert_dp}"
    return (
        f"stage {cfg.train.stage}: world {layout.world_size} = tp {par.tp} x pp {par.pp} x dp {layout.dp}"
        f" (sp {'on' if par.use_sequence_parallel else 'off'}{experts}); batch "
        f"{cfg.train.global_batch_size} = {layout.num_microbatches} micro-batches"
        f" of {cfg.train.micro_batch_size} x dp {layout.dp}; {model.precision}"
        f"{' fp8 ' + model.fp8 if model.fp8 else ''}, recompute {model.recompute or 'off'},"
        f" distributed optimizer {'on' if cfg.train.distributed_optimizer else 'off'}"
    )


def resolve(
    stage: int, script: str, argv: Sequence[str], env: Mapping[str, str]
) -> tuple[str, list[str], ExperimentConfig]:
    """(config path, overrides, resolved config) for a stage script started with ``argv``."""
    path = config_path(stage, script, env)
    overrides = env_overrides(stage, env) + check_overrides(argv, "command line")
    cfg = load_config(ExperimentConfig, path, overrides)
    if cfg.train.stage != stage:
        raise LaunchError(
            f"{path} sets train.stage={cfg.train.stage}, but this is the stage-{stage} script; "
            f"use examples/stage{cfg.train.stage}.sh for it"
        )
    return path, overrides, cfg


# --------------------------------------------------------------------------- #
# The two launch styles
# --------------------------------------------------------------------------- #


def torchrun_command(
    nodes: Nodes, rdzv: "Rendezvous", config: str, overrides: Sequence[str], env: Mapping[str, str]
) -> list[str]:
    """The command one node runs: torchrun with this node's rendezvous flags (`rendezvous_flags`)."""
    launcher = shlex.split(env.get("TORCHRUN", "").strip()) or [sys.executable, "-m", TORCHRUN_MODULE]
    return [
        *launcher,
        "--nnodes", str(nodes.nnodes),
        "--nproc-per-node", str(nodes.gpus_per_node),
        *rendezvous_flags(nodes, rdzv),
        *rdzv.torchrun_args,
        "-m", TRAIN_MODULE,
        *train_argv(config, overrides),
    ]


def launch(stage: int, script: str, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
           out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Bash style: check the config against NNODES*GPUS_PER_NODE and exec torchrun on this node.

    Warns on ``err`` when several nodes would meet on a loopback MASTER_ADDR. Prints the
    environment it sets and the exact command (a shell snippet) first; with ``DRY_RUN=1`` that
    is all it does. Returns only in a dry run (the exec replaces the process).
    """
    env = dict(os.environ if env is None else env)
    nodes = Nodes.from_env(env)
    rdzv = Rendezvous.from_env(env, stage)
    config, overrides, cfg = resolve(stage, script, argv, env)
    source = f"NNODES={nodes.nnodes} x GPUS_PER_NODE={nodes.gpus_per_node}"
    layout = world_layout(cfg, nodes.world_size, source)
    check_transformer_engine(cfg)
    warning = loopback_warning(nodes)
    if warning:
        print(f"{os.path.basename(script)}: {warning}", file=err, flush=True)
    command = torchrun_command(nodes, rdzv, config, overrides, env)
    added = {k: v for k, v in RANK_ENV_DEFAULTS.items() if k not in env}
    # The ranks run `-m cumo_megatron.train`: let them import the package this launcher uses,
    # installed or not.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python_path = env.get("PYTHONPATH", "")
    if package_root not in python_path.split(os.pathsep):
        added["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, python_path) if p)
    env.update(added)
    where = f"node {nodes.node_rank} of {nodes.nnodes}"
    if rdzv.backend == "c10d":
        where = f"one of {nodes.nnodes} nodes (c10d assigns node ranks)"
    print(f"# {where}: {describe(cfg, layout)}", file=out)
    for key, value in added.items():
        print(f"export {key}={shlex.quote(value)}", file=out)
    print(shlex.join(command), file=out, flush=True)
    if dry_run(env):
        return 0
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        raise LaunchError(
            f"{command[0]!r} not found on PATH; activate the environment that has torch, "
            "or set TORCHRUN"
        ) from None
    return 0  # not reached: exec replaced this process


def run_rank(stage: int, script: str, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
             out: TextIO = sys.stdout) -> int:
    """Python style (this file run by torchrun, once per rank): start this rank's training.

    Sets `RANK_ENV_DEFAULTS` in ``os.environ`` before anything imports torch, checks the config
    against torchrun's ``WORLD_SIZE``, then calls ``cumo_megatron.train.main(argv)``; with
    ``DRY_RUN=1`` it prints that call instead.
    """
    env = os.environ if env is None else env
    world = env_int(env, "WORLD_SIZE", 1, minimum=1)
    rank = env_int(env, "RANK", 0)
    local_rank = env_int(env, "LOCAL_RANK", 0)
    config, overrides, cfg = resolve(stage, script, argv, env)
    source = "torchrun's WORLD_SIZE"
    if "WORLD_SIZE" not in env:
        source = "no WORLD_SIZE: start this file with torchrun, or with bash"
    layout = world_layout(cfg, world, source)
    check_transformer_engine(cfg)
    for key, value in RANK_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    args = train_argv(config, overrides)
    if rank == 0 or dry_run(env):
        print(f"# rank {rank} of {world} (local rank {local_rank}): {describe(cfg, layout)}", file=out)
    if dry_run(env):
        print(f"{TRAIN_MODULE}.main({args!r})", file=out, flush=True)
        return 0
    from cumo_megatron.train import main as train_main  # imports torch: only now

    result = train_main(args)
    return result if isinstance(result, int) else 0


def script_main(stage: int, script: str, argv: Sequence[str]) -> int:
    """Entry point of the Python part of a stage script.

    ``argv[0] == "--launch"`` means the script's bash part handed over (bash style); anything else
    means torchrun (or ``python``) ran the file directly (Python style). Errors become one line
    on stderr and exit status 2, before any process group exists.
    """
    try:
        if argv[:1] == ["--launch"]:
            return launch(stage, script, argv[1:])
        return run_rank(stage, script, argv)
    except ConfigError as err:
        print(f"{os.path.basename(script)}: error: {err}", file=sys.stderr)
        return 2

