"""`student.sync_bn`: the task heads' batch norm over the batch of all processes (torch's SyncBatchNorm), as the
official code trains stage 2. Synchronising needs two GPUs (NCCL); here: what is converted, when, and that
checkpoints and exports do not change."""

from __future__ import annotations

import torch

from sak.config import load_recipe
from sak.engine.build import build_student, build_tasks, build_teachers, sync_batch_norm

from ..conftest import TESTS

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def student_of(*overrides: str):
    recipe = load_recipe(TESTS / "tiny_multitask.yaml", list(overrides))
    torch.manual_seed(0)
    return build_student(recipe, build_teachers(recipe, CPU), build_tasks(recipe))


def norms(module: torch.nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})


def test_the_heads_batch_norm_is_synchronised_over_several_gpu_processes():
    student = student_of()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert norms(student) == ["BatchNorm2d"]
    note = sync_batch_norm(student, 2, CUDA)  # (converting builds modules only: no GPU is needed for it)
    assert norms(student) == ["SyncBatchNorm"] and "over the batch of all 2 processes" in note
    after = student.state_dict()  # the same parameters and buffers: checkpoints load either way
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    plain = student_of()
    plain.load_state_dict(after)
    assert norms(plain) == ["BatchNorm2d"]


def test_nothing_is_converted_for_one_process_nor_on_the_cpu_where_torch_cannot():
    student = student_of()
    assert sync_batch_norm(student, 1, CUDA) is None and norms(student) == ["BatchNorm2d"]
    note = sync_batch_norm(student, 2, CPU)  # torch's SyncBatchNorm refuses CPU tensors in training
    assert norms(student) == ["BatchNorm2d"] and "not on the CPU" in note and "its own share" in note
    distill_only = student_of("run.stage=distill", "tasks=[]")  # no heads, no batch norm: nothing to say
    assert sync_batch_norm(distill_only, 2, CUDA) is None and norms(distill_only) == []
