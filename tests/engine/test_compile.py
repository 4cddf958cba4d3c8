"""`precision.compile_student` / `compile_teachers` / `compile_losses`: training runs the torch.compile'd modules, learns what the
eager run learns, and writes the same checkpoint keys (the student is compiled in place)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sak.engine import train
from sak.engine.build import build_distill_loss, build_student, build_tasks, build_teachers, prepare_student
from sak.engine.checkpoint import latest_checkpoint
from sak.losses.resize import _cached_gram_matrix, _cached_interpolation_matrix, gram_matrix, interpolation_matrix
from sak.registry import LOSSES


def logged_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_prepare_student_compiles_in_place_only_when_asked(tiny_recipe):
    recipe = tiny_recipe()
    teachers = build_teachers(recipe, torch.device("cpu"))
    student = build_student(recipe, teachers, build_tasks(recipe))
    keys = list(student.state_dict())
    assert prepare_student(student, recipe.precision) is student and student._compiled_call_impl is None
    recipe = tiny_recipe("precision.compile_student=true")
    assert prepare_student(student, recipe.precision) is student and student._compiled_call_impl is not None
    assert list(student.state_dict()) == keys  # no `_orig_mod.` prefix: checkpoints load either way


def test_distill_loss_compiled_only_when_asked_equals_eager_with_its_gradients(tiny_recipe):
    """precision.compile_losses compiles the loss module in place; the compiled SAK loss gives the eager one's
    value and gradients, on maps of the student's size, a smaller teacher grid and one 4x larger (where it
    takes the cosine without upsampling the student, through the cached interpolation matrices)."""
    assert build_distill_loss(tiny_recipe())._compiled_call_impl is None
    assert build_distill_loss(tiny_recipe("precision.compile_losses=true"))._compiled_call_impl is not None
    assert build_distill_loss(tiny_recipe("precision.compile_losses=true"), compiled=False)._compiled_call_impl is None
    torch.manual_seed(0)
    student = [torch.randn(2, 8, 6, 6, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(2, 8, *size) for size in ((6, 6), (4, 4), (12, 12))]
    eager, compiled = LOSSES.get("sak")(), LOSSES.get("sak")()
    compiled.compile()
    torch._dynamo.utils.counters.clear()
    for cached in (interpolation_matrix, gram_matrix):
        cached.cache_clear()
    got = compiled(student, teacher)
    assert not torch._dynamo.utils.counters["graph_break"]
    # traced, the matrices are made in the graph on the device, not taken from (or put in) the CPU-made cache
    assert _cached_interpolation_matrix.cache_info().currsize == _cached_gram_matrix.cache_info().currsize == 0
    want = eager(student, teacher)
    assert _cached_interpolation_matrix.cache_info().currsize > 0 and _cached_gram_matrix.cache_info().currsize > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, student), torch.autograd.grad(want, student), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_compiled_training_matches_eager(tiny_recipe):
    common = ["schedule.max_steps=3", "data.num_workers=0", "eval.batches=1"]
    eager = tiny_recipe(*common, "run.name=eager")
    eager_final = train(eager)
    torch._dynamo.utils.counters.clear()
    compiled = tiny_recipe(*common, "run.name=compiled", "precision.compile_student=true",
                           "precision.compile_teachers=true", "precision.compile_losses=true")  # fmt: skip
    compiled_final = train(compiled)
    # the student (train and eval mode), both teachers and the loss (one graph per teacher's map shapes) went
    # through dynamo, in whole graphs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 6
    assert not torch._dynamo.utils.counters["graph_break"]
    a, b = logged_losses(eager.run_dir), logged_losses(compiled.run_dir)
    assert len(a) == len(b) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    for key, value in eager_final.items():
        assert abs(compiled_final[key] - value) <= 1e-4 * max(1.0, abs(value)), key
    wa = load_file(str(latest_checkpoint(eager.run_dir / "checkpoints") / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(compiled.run_dir / "checkpoints") / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("extra", [[], ["student.grad_checkpointing=true"]], ids=["plain", "grad-checkpointing"])
def test_compiled_student_under_two_processes_matches_one_eager_process(extra, tmp_path, tiny_recipe):
    """Accelerate wraps the compiled student in DistributedDataParallel: the gradients are still averaged. With
    student.grad_checkpointing too, the same training (recomputation changes what is kept, not what is computed;
    drop path, whose draws differ between one process and two, is left out here: its replay is
    tests/student/test_student.py's)."""
    from .test_distributed import TINY, accelerate_launch

    common = ["schedule.max_steps=3", "eval.batches=1"]
    two = accelerate_launch(str(TINY), f"run.output_dir={tmp_path}", "run.name=two", "data.batch_size=2",
                            "precision.compile_student=true", *extra, *common)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = tiny_recipe("run.name=one", "data.batch_size=4", *common)
    train(one)
    a, b = logged_losses(one.run_dir), logged_losses(tmp_path / "two")
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    w1 = load_file(str(latest_checkpoint(one.run_dir / "checkpoints") / "model.safetensors"))
    w2 = load_file(str(latest_checkpoint(tmp_path / "two" / "checkpoints") / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-3, atol=1e-5, msg=key)


def test_compile_mode_reaches_every_torch_compile(monkeypatch, tiny_recipe):
    """precision.compile_mode is passed to torch.compile for the student, the teachers and the loss; the default
    passes no mode (torch.compile's own default)."""
    from sak.engine.build import prepare_teacher

    calls = []

    def record(fn, *args, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", record)
    flags = ["precision.compile_student=true", "precision.compile_teachers=true", "precision.compile_losses=true"]
    for mode, want in (("default", {}), ("reduce-overhead", {"mode": "reduce-overhead"})):
        calls.clear()
        recipe = tiny_recipe(*flags, f"precision.compile_mode={mode}")
        teachers = build_teachers(recipe, torch.device("cpu"))  # prepare_teacher compiles each
        prepare_student(build_student(recipe, teachers, build_tasks(recipe)), recipe.precision)
        build_distill_loss(recipe)
        assert calls == [want] * 4, mode  # two teachers, the student, the loss
    recipe = tiny_recipe("precision.compile_teachers=true", "precision.compile_mode=max-autotune-no-cudagraphs")
    calls.clear()
    prepare_teacher(build_teachers(tiny_recipe(), torch.device("cpu"))["vit_a"], recipe.precision)
    assert calls == [{"mode": "max-autotune-no-cudagraphs"}]
    assert recipe.precision.cuda_graphs is False
    assert tiny_recipe(*flags[:1], "precision.compile_mode=max-autotune").precision.cuda_graphs is True


def test_compile_mode_without_anything_compiled_is_refused(tiny_recipe):
    from sak.config import RecipeError

    with pytest.raises(RecipeError, match="precision.compile_mode: 'reduce-overhead'.*compile_student"):
        tiny_recipe("precision.compile_mode=reduce-overhead")
    with pytest.raises(RecipeError, match="precision.compile_mode"):
        tiny_recipe("precision.compile_mode=fast")


def test_cuda_graph_training_marks_every_step_and_matches_eager(monkeypatch, tiny_recipe):
    """With precision.compile_mode reduce-overhead the trainer and evaluation mark each micro-batch's and
    evaluation batch's start for the CUDA graphs; without CUDA graphs nothing is marked. On the CPU the mode
    compiles as default: the run learns what the eager run learns, the same losses and weights."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    common = ["schedule.max_steps=2", "optim.grad_accum=2", "data.num_workers=0", "eval.batches=1"]
    eager = tiny_recipe(*common, "run.name=eager")
    train(eager)
    assert marks == []
    graphs = tiny_recipe(*common, "run.name=graphs", "precision.compile_student=true",
                         "precision.compile_losses=true", "precision.compile_mode=reduce-overhead")  # fmt: skip
    train(graphs)
    assert len(marks) == 2 * 2 + 1  # 2 steps of 2 micro-batches, then the final evaluation's one batch
    a, b = logged_losses(eager.run_dir), logged_losses(graphs.run_dir)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    # compiled and eager weights differ by up to ~3e-5 here (inductor's roundings, which Adam's first steps
    # turn into whole steps for the smallest gradients); a wrong gradient would move them by about the
    # learning rate, 1e-3
    wa = load_file(str(latest_checkpoint(eager.run_dir / "checkpoints") / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(graphs.run_dir / "checkpoints") / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-3, atol=1e-4, msg=key)


def test_gradient_buffers_only_for_cuda_graphs_with_accumulation_on_cuda(tiny_recipe):
    """The trainer keeps zeroed gradient buffers of its own only where CUDA graphs would overwrite the first
    micro-batch's gradients: CUDA graphs in use, accumulation, a CUDA device. Elsewhere gradients stay None
    between steps, as without compile_mode."""
    from sak.engine.trainer import keep_gradient_buffers

    graphs = ["precision.compile_student=true", "precision.compile_mode=reduce-overhead"]
    cases = [
        (["optim.grad_accum=2", *graphs], "cuda", True),
        (["optim.grad_accum=2", *graphs], "cpu", False),
        (["optim.grad_accum=1", *graphs], "cuda", False),
        (["optim.grad_accum=2", "precision.compile_student=true"], "cuda", False),
        (["optim.grad_accum=2", graphs[0], "precision.compile_mode=max-autotune-no-cudagraphs"], "cuda", False),
    ]
    for overrides, device, kept in cases:
        recipe = tiny_recipe(*overrides, "student.freeze=stem")
        student = build_student(recipe, build_teachers(recipe, torch.device("cpu")), build_tasks(recipe))
        assert keep_gradient_buffers(student, recipe, torch.device(device)) is kept, (overrides, device)
        for name, param in student.named_parameters():
            if kept and param.requires_grad:
                assert param.grad is not None and not param.grad.any() and param.grad.shape == param.shape, name
            else:
                assert param.grad is None, name  # (the frozen stem's parameters get none either way)


def test_a_compiled_multitask_student_with_noisy_routers_trains_as_the_eager_one(tiny_recipe):
    """Stage 2's student (noisy routers drawing per-token noise in training, heads) compiled whole, no graph
    break, and the same losses as eager: with inductor's fallback_random its noise is eager's draws (without it,
    inductor's own generator draws other noise). Stage 1 alone was compiled in the tests before."""
    from torch._inductor import config as inductor_config

    from ..conftest import TESTS

    common = ["schedule.max_steps=2", "data.num_workers=0", "eval.batches=1"]
    eager = tiny_recipe(*common, "run.name=eager", path=TESTS / "tiny_multitask.yaml")
    assert eager.student.router == "noisy" and eager.tasks
    train(eager)
    torch._dynamo.utils.counters.clear()
    compiled = tiny_recipe(
        *common, "run.name=compiled", "precision.compile_student=true", path=TESTS / "tiny_multitask.yaml"
    )
    with inductor_config.patch(fallback_random=True):  # (a monkeypatch's undo deleted the key)
        train(compiled)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(torch.tensor(logged_losses(compiled.run_dir)), torch.tensor(logged_losses(eager.run_dir)),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
