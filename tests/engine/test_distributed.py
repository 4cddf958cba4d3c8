"""Two real CPU processes through the documented command, and a run killed while checkpointing."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sak.engine import train
from sak.engine.cache import build_cache
from sak.engine.checkpoint import PARTIAL, latest_checkpoint

from ..conftest import REPO, TINY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(
    *args: str, env: dict | None = None, module: str = "sak.train", timeout: int = 600
) -> subprocess.CompletedProcess:
    """The command docs/getting-started.md gives for N CPU processes."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", module, *args,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def image_folder(root: Path, train: int, val: int = 4) -> list[str]:
    """`train` + `val` random PNGs under root/{train,val}; the overrides that read them (an image folder, whose
    files are in a cache's content digest)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / split / f"im{i}.png")
    return ["data.name=image_folder", f"data.root={root}", "data.options={}"]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_recipe):
    # with the targets standardised: their statistics are summed over the processes (one collective a step)
    # eval.batches=3 of 2 images: the same 6 held-out images in both runs (the second process's second batch,
    # global batch 3, is run but left out)
    common = ["schedule.max_steps=4", "logging.sample_ids=true", "loss.normalize=standardize", "eval.batches=3",
              "eval.batch_size=2", "eval.at_start=true"]  # fmt: skip
    two = accelerate_launch(str(TINY), f"run.output_dir={tmp_path}", "run.name=two", "data.batch_size=2", *common)
    assert two.returncode == 0, two.stderr[-3000:]
    one = tiny_recipe("run.name=one", "data.batch_size=4", *common)
    train(one)
    two_dir = tmp_path / "two"

    assert json.loads((two_dir / "run_info.json").read_text())["world_size"] == 2
    ranks = [rows(two_dir / "samples" / f"rank{r}.jsonl") for r in (0, 1)]
    single = rows(one.run_dir / "samples" / "rank0.jsonl")
    for step in range(4):
        ids0, ids1 = set(ranks[0][step]["ids"]), set(ranks[1][step]["ids"])
        assert len(ids0) == len(ids1) == 2 and not ids0 & ids1, "each process must see its own shard"
        assert ids0 | ids1 == set(single[step]["ids"]), "together they see the single process's batch"

    loss_two = {r["step"]: r["loss"] for r in rows(two_dir / "metrics.jsonl") if "loss" in r}
    loss_one = {r["step"]: r["loss"] for r in rows(one.run_dir / "metrics.jsonl") if "loss" in r}
    assert loss_two.keys() == loss_one.keys() == {1, 2, 3, 4}
    for step in loss_one:
        assert loss_two[step] == pytest.approx(loss_one[step], rel=1e-5)
    val_two = [r for r in rows(two_dir / "metrics.jsonl") if "val/cosine/vit_a" in r]
    val_one = [r for r in rows(one.run_dir / "metrics.jsonl") if "val/cosine/vit_a" in r]
    assert [r["step"] for r in val_two] == [r["step"] for r in val_one] == [0, 4]
    for a, b in zip(val_two, val_one, strict=True):
        for key in ("val/cosine/vit_a", "val/cosine/vit_b", "val/loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    w2 = load_file(str(latest_checkpoint(two_dir / "checkpoints") / "model.safetensors"))
    w1 = load_file(str(latest_checkpoint(one.run_dir / "checkpoints") / "model.safetensors"))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=1e-4, msg=key)


PROBE = """
import os
import torch
from sak.losses.distill import SAKDistill
from sak.registry import LOSSES

@LOSSES.register("probe")
class Probe(SAKDistill):
    def forward(self, student, teacher):  # one draw from the training's random stream per call, per process
        with open(os.path.join(os.environ["PROBE_DIR"], f"rank{os.environ.get('RANK', '0')}.txt"), "a") as f:
            f.write(f"{torch.rand(()).item():.8f}\\n")
        return super().forward(student, teacher)
"""


def test_each_process_draws_its_own_random_numbers(tmp_path):
    """Seeded alike to build the same modules, the processes then train on streams of their own: with one stream
    the noisy router's noise and drop path drew the same values on every process's shard of the batch."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "rng_probe.py").write_text(PROBE)
    env = {**os.environ, "PROBE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    two = accelerate_launch(
        str(TINY), f"run.output_dir={tmp_path}", "run.name=two", "imports=[rng_probe]", "loss.distill=probe",
        "schedule.max_steps=2", "eval.at_start=false", "eval.batches=1", env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    draws = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(draws[0]) == len(draws[1]) > 2
    assert not set(draws[0]) & set(draws[1]), draws


TWICE = """
import sys

import torch.distributed as dist

from sak.config import load_recipe
from sak.engine import train

train(load_recipe(sys.argv[1], sys.argv[2:]))
assert dist.is_initialized(), "train() destroyed the launch's process group"
train(load_recipe(sys.argv[1], [*sys.argv[2:], "run.name=again"]))
dist.barrier()
print("trained twice")
"""


def test_a_run_with_a_tracker_leaves_the_launchs_process_group_alone(tmp_path):
    """Closing the trackers called Accelerate's end_training, which destroys the process group: with tensorboard
    (or wandb, on by default) a second train() in the process died in its first barrier on every rank."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "twice.py").write_text(TWICE)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    out = accelerate_launch(
        str(TINY), f"run.output_dir={tmp_path}", "logging.tensorboard=true", "logging.wandb.mode=disabled",
        "logging.progress=false", "schedule.max_steps=1", "eval.batches=1", env=env, module="twice",
    )  # fmt: skip
    assert out.returncode == 0 and "trained twice" in out.stdout, out.stderr[-3000:]


def test_the_last_rounds_padding_weighs_in_no_validation_value(tmp_path, tiny_recipe):
    """32 held-out images in batches of 3 on 2 processes: the last round is [30, 31] + one padded image on the
    first process and three padded ones on the second. The validation losses and cosines must be those of one
    process, whose last batch is [30, 31]. (Next to no training: lr 1e-12, so both runs score the same weights to 1e-12.)"""
    common = ["schedule.max_steps=1", "optim.lr=1e-12", "eval.batch_size=3", "eval.batches=0", "eval.at_start=false"]
    two = accelerate_launch(str(TINY), f"run.output_dir={tmp_path}", "run.name=two", "data.batch_size=2", *common)
    assert two.returncode == 0, two.stderr[-3000:]
    one = tiny_recipe("run.name=one", "data.batch_size=4", *common)
    final = train(one)
    [val_two] = [r for r in rows(tmp_path / "two" / "metrics.jsonl") if "val/loss" in r]
    assert {k for k in final if k.startswith("val/")} == {k for k in val_two if k.startswith("val/")}
    for key in (k for k in final if k.startswith("val/")):
        assert val_two[key] == pytest.approx(final[key], rel=1e-6), key


def test_two_processes_build_the_cache_one_process_builds(tmp_path, tiny_recipe):
    """docs/cache.md's `accelerate launch ... -m sak.cli cache build`: shard k on process k % 2, with loader
    workers, and the same files as one process writes (the manifest's content digests too, hashed half by each
    process)."""
    common = [f"run.output_dir={tmp_path}", *image_folder(tmp_path / "images", train=10), "data.num_workers=1"]
    two = accelerate_launch("cache", "build", str(TINY), *common, "--out", str(tmp_path / "two"), "--shard-size", "3",
                            "--views", "2", "--augment", module="sak.cli")  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("teacher-feature cache ready") == 1  # said by the main process only
    assert "cache shards (process 0's 4 of 8)" in two.stderr  # its bar counts its own shards, and says so
    one = build_cache(tiny_recipe(*common), tmp_path / "one", views=2, augment=True, shard_size=3)
    names = sorted(p.relative_to(one).as_posix() for p in one.rglob("*.safetensors"))
    assert len(names) == 8 and names == sorted(p.relative_to(tmp_path / "two").as_posix()
                                               for p in (tmp_path / "two").rglob("*.safetensors"))  # fmt: skip
    manifests = [json.loads((root / "manifest.json").read_text()) for root in (one, tmp_path / "two")]
    assert manifests[0] == manifests[1] and manifests[0]["status"] == "complete"


def test_two_processes_train_from_a_cache_and_both_refuse_a_corrupt_shard(tmp_path, tiny_recipe):
    """The shards, and the image files of the cache's content digest, are hashed half by each process and the
    findings pooled (the pooled digests are those one process built the cache with): a shard only the other
    process hashed stops both (no process left waiting in a collective)."""
    data = image_folder(tmp_path / "images", train=8)
    common = [f"run.output_dir={tmp_path}", *data, "schedule.max_steps=2", "data.batch_size=2"]
    root = build_cache(tiny_recipe(*common), tmp_path / "c", shard_size=2)  # 4 shards
    ok = accelerate_launch(str(TINY), *common, "run.name=ok", f"cache.path={root}", timeout=180)
    assert ok.returncode == 0, ok.stderr[-3000:]
    shard = root / "view0" / "shard00001.safetensors"  # hashed by the second process only
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    bad = accelerate_launch(str(TINY), *common, "run.name=bad", f"cache.path={root}", timeout=180)
    assert bad.returncode != 0
    line = f"sak train: CacheError: cache {root}: shard view0/shard00001 is corrupt"  # one line, no traceback
    assert bad.stderr.count(line) == 2, bad.stderr[-3000:]  # from both processes
    assert ".CacheError:" not in bad.stderr  # (a traceback ends "sak.engine.cache.store.CacheError: ...")


def test_sigkill_while_writing_a_checkpoint_leaves_the_last_one_loadable(tmp_path, tiny_recipe):
    marker = tmp_path / "writing"
    run = [sys.executable, "-m", "sak.train", str(TINY), f"run.output_dir={tmp_path}", "checkpoint.every=1",
           "imports=[tests.plugins.slow_checkpoint]"]  # fmt: skip
    env = {**os.environ, "SAK_TEST_MARKER": str(marker)}
    proc = subprocess.Popen(run, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), f"the run never reached its second checkpoint: {proc.communicate()[0][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    root = tmp_path / "tiny" / "checkpoints"
    assert Path(marker.read_text()).name == f"step_00000002{PARTIAL}"
    assert latest_checkpoint(root).name == "step_00000001"
    resumed = tiny_recipe("schedule.max_steps=3")
    train(resumed)
    assert not list(root.glob(f"*{PARTIAL}")), "half-written checkpoints are cleaned on resume"
    assert latest_checkpoint(root).name == "step_00000003"
    assert {r["step"] for r in rows(tmp_path / "tiny" / "metrics.jsonl") if "loss" in r} == {1, 2, 3}


def test_a_checkpoint_one_process_cannot_write_stops_every_process_and_keeps_the_last_one(tmp_path):
    """Process 1 meeting a full disk raised alone, and process 0 waited at the next barrier for a save that would
    never come. Every process now says it, the partial folder is removed and the last complete one stays."""
    out = accelerate_launch(str(TINY), f"run.output_dir={tmp_path}", "checkpoint.every=1", "schedule.max_steps=3",
                            "imports=[tests.plugins.full_disk_on_process_1]", timeout=300)  # fmt: skip
    assert out.returncode != 0
    assert "cannot write checkpoint step_00000002.partial" in out.stderr, out.stderr[-3000:]
    assert "process 1 could not write its part: OSError: [Errno 28] No space left on device" in out.stderr
    root = tmp_path / "tiny" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]


def test_a_split_with_fewer_whole_batches_than_processes_is_an_error_not_a_hang(tmp_path):
    """6 samples in batches of 4 make one batch, and two processes would each get none: epochs without a
    step, one after another, forever."""
    bad = accelerate_launch(str(TINY), f"run.output_dir={tmp_path}", "data.options.length=6", "data.batch_size=4",
                            "schedule.max_steps=2", timeout=120)  # fmt: skip
    assert bad.returncode != 0
    assert "6 samples, 1 whole batch(es) of data.batch_size=4: fewer than one for each of the 2 processes" in bad.stderr


def test_a_resume_one_process_refuses_changes_nothing_in_the_run_directory(tmp_path):
    """Process 1's random states damaged: it refused the resume while process 0 had set the later checkpoint
    aside and rewritten the run's records, then died at a barrier. Now both refuse, before anything moves."""
    common = [str(TINY), f"run.output_dir={tmp_path}", "data.options.length=16", "schedule.max_steps=4",
              "checkpoint.every=2", "data.batch_size=2"]  # fmt: skip
    assert accelerate_launch(*common, timeout=300).returncode == 0
    root = tmp_path / "tiny" / "checkpoints"
    (root / "step_00000002" / "random_states_1.pkl").write_bytes(b"not a pickle")
    starts = (tmp_path / "tiny" / "starts.jsonl").read_text()
    run = accelerate_launch(*common, f"checkpoint.resume={root / 'step_00000002'}", timeout=300)
    assert run.returncode != 0
    assert "process 1 refused the resume: CheckpointError" in run.stderr, run.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]  # nothing set aside
    assert (tmp_path / "tiny" / "starts.jsonl").read_text() == starts
    # a copy that lost process 1's random states looked like one process's checkpoint, and one process resumed it,
    # training again on samples the other process had trained on
    from sak.config import load_recipe
    from sak.engine.checkpoint import CheckpointError

    (root / "step_00000004" / "random_states_1.pkl").unlink()
    with pytest.raises(CheckpointError, match=r"it was written by 2 process\(es\) and this run has 1"):
        train(
            load_recipe(common[0], [*common[1:], "schedule.max_steps=6", f"checkpoint.resume={root / 'step_00000004'}"])
        )


def test_a_run_directory_the_main_process_cannot_prepare_stops_every_process_with_its_reason(tmp_path):
    """Each rank started on its own, as a cluster's scheduler does (no torchrun agent to stop the others when one
    fails): the main process's error was its own, and process 1 died at the next barrier with gloo's "Connection
    closed by peer" (with NCCL across nodes: waited for its timeout). Now process 1 says the main process's
    reason and stops."""
    (tmp_path / "tiny").symlink_to(tmp_path / "unmounted" / "runs")
    port, procs = str(free_port()), []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")  # fmt: skip
        cmd = [sys.executable, "-m", "sak.train", str(TINY), f"run.output_dir={tmp_path}", "schedule.max_steps=2"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
    said = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2], said[1][-3000:]
    assert "is a symbolic link to" in said[0]
    assert "process 0 could not prepare the run directory: FileNotFoundError" in said[1], said[1][-3000:]


def test_a_recipe_error_is_said_once_not_by_each_process(tmp_path):
    bad = accelerate_launch(str(TINY), f"run.output_dir={tmp_path}", "optim.nosuch=1", timeout=120)
    assert bad.returncode != 0
    assert bad.stderr.count("unknown key 'optim.nosuch'") == 1, bad.stderr[-3000:]


def test_a_finished_run_of_another_number_of_processes_returns_its_final_metrics(tiny_recipe):
    """Started again on another number of processes, a finished run was refused (its random states are not this
    launch's), though nothing was left to do: it returns its final metrics, as on its own number. Training it on
    is refused, naming them."""
    from sak.engine import train
    from sak.engine.checkpoint import CheckpointError, latest_checkpoint

    final = train(tiny_recipe("schedule.max_steps=2"))
    ckpt = latest_checkpoint(tiny_recipe().run_dir / "checkpoints")
    (ckpt / "random_states_1.pkl").write_bytes((ckpt / "random_states_0.pkl").read_bytes())  # as 2 processes write
    assert train(tiny_recipe("schedule.max_steps=2")) == pytest.approx(final, nan_ok=True)
    assert (tiny_recipe().run_dir / "final_metrics.json").is_file()
    with pytest.raises(
        CheckpointError, match=f"a finished run's last checkpoint: its final metrics are in {ckpt}/final_metrics.json"
    ):
        train(tiny_recipe("schedule.max_steps=3"))
