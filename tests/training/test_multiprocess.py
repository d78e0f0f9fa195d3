"""Two processes through ``accelerate launch``: DDP over gloo on the CPU, the same code as multi-GPU."""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from sspo.io import write_parquet
from sspo.worlds.shapes.world import make_split, preference_pairs

from test_trainer import pairs_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config, tmp_path, program: tuple[str, ...] = ("-m", "sspo", "train")) -> subprocess.CompletedProcess:
    """``sspo train config`` (or ``program config``) in two processes."""
    # `--cpu --num_processes 2` would start one process (accelerate's CPU launcher wants mpirun);
    # torchrun's launcher (`--multi_gpu`) with ACCELERATE_USE_CPU gives two gloo processes.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        *program, str(config),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def launch_patched(program: str, quick_base: str, tmp_path, run, **settings) -> subprocess.CompletedProcess:
    """``program`` (``sspo train`` with a patch) in two processes: a tiny run into ``run`` on 8 pairs of
    the shapes world at 32 px, one iteration of one step unless ``settings`` (top-level keys) say otherwise."""
    data = write_parquet(tmp_path / "pairs.parquet", preference_pairs(make_split().train[:8], per_spec=1, seed=0))
    script, config = tmp_path / "program.py", tmp_path / f"{run.name}.yaml"
    script.write_text(program)
    config.write_text(yaml.safe_dump(pairs_settings(run, quick_base, data) | {"iterations": 1, **settings}))
    return launch(config, tmp_path, (str(script),))


def test_two_processes_train_and_keep_identical_replicas(quick_base, tmp_path):
    data = write_parquet(tmp_path / "pairs.parquet", preference_pairs(make_split().train[:8], per_spec=1, seed=0))
    run = tmp_path / "run"
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(pairs_settings(run, quick_base, data)))
    done = launch(config, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.splitlines() == [str(run / "final")]  # printed once, by the main process

    # Each process trained on its own rows and negatives; DDP's averaged gradients keep the replicas equal.
    state = json.loads(sorted((run / "checkpoints").glob("step-*/trainer_state.json"))[-1].read_text())
    assert state["global_step"] == 2
    assert len(state["replicas"]) == 2 and state["replicas"][0] == state["replicas"][1]
    pool = json.loads((run / "pool" / "pool.json").read_text())["entries"]
    assert [entry["step"] for entry in pool] == [0, 1, 2]  # written once, by the main process
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert "2 processes" in (run / "final" / "README.md").read_text()


def test_errors_the_main_process_finds_stop_both_processes_with_it(quick_base, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")  # not a run folder: refused before any process sets up
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({"model": {"pretrained": quick_base}, "output_dir": str(run), "report_to": "none"}))
    done = launch(config, tmp_path)
    refusal = f"sspo: error: output_dir {run} holds files that are not an sspo run (notes.txt)"
    assert done.returncode != 0 and done.stderr.count(refusal) == 2, done.stderr[-4000:]  # the other process stops with it, not killed waiting
    assert [p.name for p in run.iterdir()] == ["notes.txt"]

    (tmp_path / "empty").mkdir()  # a reward model only the main process loads, once the processes have set up
    config.write_text(yaml.safe_dump({"model": {"pretrained": quick_base}, "output_dir": str(tmp_path / "run2"), "report_to": "none",
                                      "validation": {"every_iterations": 1, "metrics": ["pickscore"], "prompts": ["a red circle"],
                                                     "scorer_paths": {"pickscore": str(tmp_path / "empty")}}}))
    done = launch(config, tmp_path)
    assert done.returncode != 0 and done.stderr.count("sspo: error: metric 'pickscore': cannot load the CLIP model") == 2, done.stderr[-4000:]
    assert "stopped by SIGTERM" not in done.stderr


# The second process's first step reports a NaN loss whose gradients are finite: only that process sees it.
NAN_LOSS_IN_ONE_PROCESS = """
import os, sys
from sspo.cli import main
from sspo.training import trainer

loss = trainer.Trainer.loss

def loss_reported_nan(self, batch):
    value, metrics = loss(self, batch)
    if os.environ["RANK"] == "1" and self.global_step == 0:
        metrics["loss"] = metrics["loss"] * float("nan")
    return value, metrics

trainer.Trainer.loss = loss_reported_nan
sys.exit(main(["train", sys.argv[1]]))
"""


def test_a_non_finite_loss_in_one_process_is_skipped_by_all(quick_base, tmp_path):
    run = tmp_path / "run"
    done = launch_patched(NAN_LOSS_IN_ONE_PROCESS, quick_base, tmp_path, run, optim={"batch_size": 2, "learning_rate": 1e-2}, steps_per_iteration=2,
                          nonfinite="skip")
    assert done.returncode == 0, done.stderr[-4000:]
    state = json.loads(sorted((run / "checkpoints").glob("step-*/trainer_state.json"))[-1].read_text())
    assert state["nonfinite_skips"] == 1 and state["replicas"][0] == state["replicas"][1]  # one process stepping alone would split them


# Each process reports its rank as the micro-batch's SSR rate.
RANK_AS_METRIC = """
import os, sys
import torch
from sspo.cli import main
from sspo.training import trainer

loss = trainer.Trainer.loss

def loss_with_rank(self, batch):
    value, metrics = loss(self, batch)
    metrics["ssr_rate"] = torch.tensor(float(os.environ["RANK"]))
    return value, metrics

trainer.Trainer.loss = loss_with_rank
sys.exit(main(["train", sys.argv[1]]))
"""


def test_the_logged_metrics_are_the_mean_over_processes_and_the_schedule_counts_optimizer_steps(quick_base, tmp_path):
    run = tmp_path / "run"
    done = launch_patched(RANK_AS_METRIC, quick_base, tmp_path, run, optim={"batch_size": 2, "learning_rate": 1e-3, "lr_scheduler": "linear"},
                          steps_per_iteration=2)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["ssr_rate"] for row in rows] == [0.5, 0.5]
    assert [row["lr"] for row in rows] == pytest.approx([5e-4, 0.0])  # linear to 0 over the run's 2 optimizer steps, as with one process


# The second process reads its pool from a folder of its own, as from an output_dir on its machine's own disk.
POOL_OF_ITS_OWN = """
import os, sys
from sspo.cli import main
from sspo.training import checkpoints

class PoolOfItsOwn(checkpoints.CheckpointPool):
    def __init__(self, root, denoiser=None):
        super().__init__(f"{root}-{os.environ['RANK']}" if os.environ["RANK"] == "1" else root, denoiser)

checkpoints.CheckpointPool = PoolOfItsOwn
sys.exit(main(["train", sys.argv[1]]))
"""


def test_an_output_dir_that_is_not_the_same_folder_in_every_process_is_refused(quick_base, tmp_path):
    run = tmp_path / "run"
    done = launch_patched(POOL_OF_ITS_OWN, quick_base, tmp_path, run)
    refusal = f"sspo: error: output_dir {run}: process 1 reads another checkpoint pool than the main process wrote"
    assert done.returncode != 0 and done.stderr.count(refusal) == 2, done.stderr[-4000:]
    assert not (run / "checkpoints").exists()


# The main process validates for 5 s while the other waits for it.
SLOW_VALIDATION = """
import sys, time
from sspo.cli import main
from sspo.training import trainer

validate = trainer.Trainer.validate

def slow_validation(self):
    if self.accelerator.is_main_process:
        time.sleep(5)
    return validate(self)

trainer.Trainer.validate = slow_validation
sys.exit(main(["train", sys.argv[1]]))
"""


def test_processes_wait_for_the_main_ones_validation_as_long_as_process_timeout_s(quick_base, tmp_path):
    for timeout, stops in ((2, True), (60, False)):
        done = launch_patched(SLOW_VALIDATION, quick_base, tmp_path, tmp_path / f"run-{timeout}", process_timeout_s=timeout, method="sft",
                              validation={"every_iterations": 1, "prompts": ["a red circle"]})
        assert (done.returncode != 0) == stops, done.stderr[-4000:]
        lost = "sspo: error: process 1 lost the others at a collective ("
        assert (lost in done.stderr) == stops and "[rank1]: Traceback" not in done.stderr, done.stderr[-4000:]
