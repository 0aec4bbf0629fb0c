"""Shared pieces of the training tests: a tiny LLaVA dataset on disk, configs, and launchers.

Runs that are killed with SIGKILL go through `cumo_megatron.train` in subprocesses (``python -m``
or ``torchrun``: `launch`), exactly as a user would run them. Runs that finish can share one
process: `train_in_process` runs several, one after another, on the ranks of one
`tests.helpers.distributed.run_distributed` launch (a launch costs more than a tiny run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from cumo_megatron.config.loader import save_config
from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import DataConfig, ExperimentConfig, ParallelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 256  # > every sample of make_dataset: nothing is truncated or skipped
VOCAB = 320  # tests.fixtures.tiny_models.tiny_sentencepiece's vocabulary


def make_dataset(directory: Path, num_images: int = 16, num_text: int = 4) -> dict:
    """Tokenizer, images and a vicuna_v1 LLaVA JSON under ``directory``; returns their paths."""
    from tests.fixtures.tiny_models import save_images, shape_sentences, tiny_sentencepiece

    directory = Path(directory)
    tokenizer = tiny_sentencepiece(directory / "tok")
    images = save_images(directory / "images", num_images, size=32, seed=0)
    sentences = shape_sentences(200, seed=1)
    rng = random.Random(0)
    records = []
    for i, image in enumerate(images):
        records.append({"id": f"img{i}", "image": image.name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": rng.choice(sentences)}]})
    for i in range(num_text):
        q, a = rng.choice(sentences), rng.choice(sentences)
        records.append({"id": f"txt{i}", "conversations": [
            {"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    data = directory / "train.json"
    data.write_text(json.dumps(records))
    return {"tokenizer": str(tokenizer), "image_folder": str(directory / "images"), "file": str(data)}


def make_eval_file(dataset: dict, path: Path, num_images: int = 5, num_text: int = 2, seed: int = 7) -> str:
    """A held-out LLaVA JSON beside ``dataset``'s (its images and tokenizer, other answers)."""
    from tests.fixtures.tiny_models import shape_sentences

    images = sorted(r["image"] for r in json.loads(Path(dataset["file"]).read_text()) if "image" in r)
    sentences = shape_sentences(200, seed=seed)
    rng = random.Random(seed)
    records = [{"id": f"eval-img{i}", "image": images[i % len(images)], "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": rng.choice(sentences)}]}
        for i in range(num_images)]
    records += [{"id": f"eval-txt{i}", "conversations": [
        {"from": "human", "value": rng.choice(sentences)}, {"from": "gpt", "value": rng.choice(sentences)}]}
        for i in range(num_text)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return str(path)


def tiny_model(stage: int = 3):
    """The tiny CuMo for ``stage`` (MoE vision and connector in stage 3) at the tokenizer's vocab."""
    model = tiny(moe=stage == 3)
    model.language.vocab_size = VOCAB
    return model


def experiment(dataset: dict, save: str, stage: int = 3, **train) -> ExperimentConfig:
    """The tiny CuMo experiment on the tiny dataset (MoE vision/connector in stage 3)."""
    model = tiny_model(stage)
    defaults = dict(stage=stage, lr=2e-3, warmup_fraction=0.2, global_batch_size=4, micro_batch_size=1,
                    train_steps=6, save=save, save_interval=2, keep_last=2, distributed_optimizer=True)
    defaults.update(train)
    return ExperimentConfig(
        model=model,
        parallel=ParallelConfig(),
        data=DataConfig(files=[dataset["file"]], image_folder=dataset["image_folder"], template="vicuna_v1",
                        tokenizer=dataset["tokenizer"], max_length=MAX_LENGTH, num_workers=0),
        train=TrainConfig(**defaults),
        seed=1234,
    )


def write_config(cfg: ExperimentConfig, path: Path) -> Path:
    """YAML of ``cfg`` (what a user passes with ``--config``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_LAUNCH_MARK = "CUMO_TEST_LAUNCH_ID"


def _kill_marked(mark: str) -> None:
    """SIGKILL leftovers of one launch, found by the marker in their environment (Linux /proc).

    torchrun starts each rank in a session of its own, so killing the launch's session misses
    the helpers of a rank that was SIGKILLed; the marker names exactly this launch's processes.
    """
    needle = f"{_LAUNCH_MARK}={mark}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def launch(config: Path, overrides: list[str] = (), nproc: int = 1, faults: list[str] = (),
           timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``cumo_megatron.train`` on ``nproc`` processes; return the finished process.

    ``faults`` (``["--kill-during-save", "4"]``): run it wrapped by `tests.training.faults`.

    The run gets its own session, and whatever is left of it afterwards is killed: a rank killed
    with SIGKILL orphans megatron's checkpoint-writer helper processes (a multiprocessing manager),
    which would otherwise live on. Output goes to files, not pipes, for the same reason (an orphan
    holding a pipe would keep it open).
    """
    entry = ["tests.training.faults", *faults, "--"] if faults else ["cumo_megatron.train"]
    if nproc == 1:
        cmd = [sys.executable, "-m", *entry]
    else:
        # As the stage scripts launch: torchrun that exits with the failed rank's status.
        cmd = [sys.executable, "-m", "cumo_megatron.torchrun", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", *entry]
    cmd += ["--config", str(config), *overrides]
    full_env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env[_LAUNCH_MARK] = uuid.uuid4().hex  # inherited by every process of this run
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the run's own session: orphans only
            except ProcessLookupError:
                pass
            proc.wait()
            _kill_marked(full_env[_LAUNCH_MARK])
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())


def check(proc: subprocess.CompletedProcess, expect_rc: int = 0) -> None:
    """Fail with the run's output when its exit status is not ``expect_rc``."""
    if proc.returncode != expect_rc:
        raise AssertionError(
            f"train exited {proc.returncode}, expected {expect_rc}:\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-8000:]}"
        )


def read_metrics(save: str | Path) -> list[dict]:
    """Training and validation rows of ``<save>/metrics.jsonl`` (checkpoint rows: `checkpoint_rows`)."""
    return [row for row in _metrics_rows(save) if row.get("split") != "checkpoint"]


def checkpoint_rows(save: str | Path) -> list[dict]:
    """The checkpoint rows of ``<save>/metrics.jsonl`` (one per committed save), as written."""
    return [row for row in _metrics_rows(save) if row.get("split") == "checkpoint"]


def _metrics_rows(save: str | Path) -> list[dict]:
    path = Path(save) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_in_process(runs: list[dict]) -> list[dict]:
    """Train each of ``runs`` (``{"config": FILE, "overrides": [...]}``) in this process, in order.

    Every rank of a `run_distributed` launch calls this; each run reads its configuration as the
    entry point does (`parse_cli`) and resumes from ``<train.save>/latest`` when it exists. A run
    with ``"restart_from": {"dir", "iteration"}`` first gets, as its save directory, what a run
    killed right after saving that iteration would have left of ``dir`` (`left_after_save`). Returns
    per run the checkpoint it resumed from (or None), the iteration it reached, the modules its
    ``train.load`` co-upcycled, this rank's trained weights (`model_shards`) and its validation
    rows (`Trainer.validation_rows`). A run with
    ``"expect_error": True`` must fail in setup with a `ConfigError`: its entry is the error's
    ``{"error": class name, "message": text}``.
    """
    import torch

    from cumo_megatron.config.loader import ConfigError, parse_cli
    from cumo_megatron.config.schema import ExperimentConfig
    from cumo_megatron.training.loop import Trainer

    done = []
    for run in runs:
        cfg = parse_cli(ExperimentConfig, ["--config", run["config"], *run.get("overrides", [])])
        if "restart_from" in run:
            if torch.distributed.get_rank() == 0:
                left_after_save(run["restart_from"]["dir"], cfg.train.save, run["restart_from"]["iteration"])
            torch.distributed.barrier()
        if run.get("expect_error"):
            try:
                Trainer(cfg).setup()
            except ConfigError as exc:
                done.append({"error": type(exc).__name__, "message": str(exc)})
                continue
            raise AssertionError(f"{run} was expected to fail in setup")
        trainer = Trainer(cfg).setup()
        trainer.train()
        done.append({"resumed_from": trainer.resume_from, "iteration": trainer.iteration,
                     "upcycled": trainer.load_report["upcycled"] if trainer.load_report else None,
                     "shards": model_shards(trainer.model), "validation": trainer.validation_rows})
    return done


def left_after_save(run_dir: str | Path, dest: str | Path, iteration: int) -> None:
    """Copy the save directory ``run_dir`` to ``dest`` as a run killed right after saving
    ``iteration`` would have left it: later checkpoints gone, ``latest`` naming ``iteration``,
    metrics up to that step."""
    import shutil

    from cumo_megatron.training.pointers import iteration_dir, list_checkpoints, write_latest

    shutil.copytree(run_dir, dest)
    for later in [i for i in list_checkpoints(dest) if i > iteration]:
        shutil.rmtree(iteration_dir(dest, later))
    write_latest(Path(dest), iteration)
    metrics = Path(dest) / "metrics.jsonl"
    rows = [line for line in metrics.read_text().splitlines() if line.strip()]
    metrics.write_text("".join(line + "\n" for line in rows if json.loads(line)["step"] <= iteration))


def model_shards(model) -> list[tuple]:
    """``(key, global shape, global slice, tensor)`` of each sharded tensor ``model`` holds on this rank.

    Key, shape and slice say where the tensor sits in the checkpoint's global tensor (megatron's
    `ShardedTensor.global_slice`: an index per stacked layer axis, then slices), whatever the layout.
    """
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return [(t.key, t.global_shape, t.global_slice(), t.data.detach().clone())
            for t in nested_values(model.sharded_state_dict()) if isinstance(t, ShardedTensor)]


_HOLDER = """
import os, sys, time
from cumo_megatron.training.lock import SaveDirLock
lock = SaveDirLock.acquire(sys.argv[1])
child = os.fork() if sys.argv[2] == "fork" else 0
if child == 0 and sys.argv[2] == "fork":
    time.sleep(600)  # a helper process the trainer started (inherits the lock file's descriptor)
    os._exit(0)
print("locked", child, flush=True)
time.sleep(600)
"""


def hold_lock(directory: str | Path, fork_child: bool = False) -> tuple[subprocess.Popen, int]:
    """A process holding ``directory``'s save lock (`training.lock`), as a running trainer would.

    With ``fork_child`` it first forks a child that lives on, as DataLoader workers and megatron's
    checkpoint-writer helpers do. Returns the process and the child's pid (0 without one); the
    caller kills both.
    """
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(directory), "fork" if fork_child else "-"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if line[:1] != ["locked"]:
        proc.kill()
        raise AssertionError(f"the lock holder did not start: {line}")
    return proc, int(line[1])
