"""The SAK student's parts: adapter paths, the per-task mixing, heads, gradient flow, and stage 1 -> stage 2."""

import json

import pytest
import torch

from benchmarks.activation_memory import saved_bytes
from sak.data import DatasetSpec, build_dataset
from sak.engine import train
from sak.engine.build import build_distill_loss, build_student, build_tasks, build_teachers
from sak.engine.step import compute_losses, teacher_targets
from sak.student import SAKStudent, TeacherAgnosticStem, TeacherSlot, parameter_report
from sak.student.adapters import ADAPTERS, BottleneckAdapter, TeacherSpecificAdapterPath, TokenGrid
from sak.student.baselines import ManyToOneStudent
from sak.student.router import NoisyRouter, PixelRouter

from ..conftest import TESTS


def test_adapter_is_a_scaled_residual_bottleneck_and_path_follows_the_paper_recurrence():
    torch.manual_seed(0)
    a = BottleneckAdapter(8, 4)
    assert a.down.out_features == 2 and a.scale.item() == 1.0
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        a.scale.fill_(0.5)
    torch.testing.assert_close(a(x), x + 0.5 * a.up(torch.nn.functional.gelu(a.down(x))))
    path = TeacherSpecificAdapterPath(8, depth=3, levels=[1, 2])
    emb, outs = torch.randn(2, 5, 8), [torch.randn(2, 5, 8) for _ in range(3)]
    p0 = path.adapters[0](emb)
    p1 = path.adapters[1](p0 + outs[0])
    p2 = path.adapters[2](p1 + outs[1])
    p3 = path.adapters[3](p2 + outs[2])
    got = path(emb, outs)
    torch.testing.assert_close(got[0], path.norms[0](p2))
    torch.testing.assert_close(got[1], path.norms[1](p3))


def test_token_grid_splits_prefix_and_row_major_patches_and_joins_them_back():
    grid = TokenGrid(prefix=1, h=2, w=3)
    tokens = torch.arange(2 * 7 * 4, dtype=torch.float32).reshape(2, 7, 4)
    prefix, patches = grid.split(tokens)
    assert prefix.shape == (2, 1, 4) and patches.shape == (2, 4, 2, 3)
    torch.testing.assert_close(prefix[:, 0], tokens[:, 0])
    torch.testing.assert_close(patches[:, :, 1, 0], tokens[:, 1 + 3])  # row 1, column 0: the 4th patch
    torch.testing.assert_close(grid.join(prefix, patches), tokens)
    with pytest.raises(ValueError, match=r"\(2, 8, 4\).*1 prefix tokens \+ 2 x 3 patches"):
        grid.split(torch.zeros(2, 8, 4))
    with pytest.raises(ValueError, match="do not make"):
        grid.join(prefix, patches.transpose(-1, -2))


class _GridRecorder(torch.nn.Module):
    """An adapter that records the grid it is given (and adds nothing)."""

    def __init__(self, dim: int, down_ratio: int = 4) -> None:
        super().__init__()
        self.seen: list[TokenGrid] = []

    def forward(self, x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        self.seen.append(grid)
        return x


def test_path_gives_the_grid_only_to_adapters_that_take_one(monkeypatch):
    monkeypatch.setitem(ADAPTERS._entries, "grid_recorder", _GridRecorder)
    path = TeacherSpecificAdapterPath(8, depth=2, levels=[1], adapter="grid_recorder")
    assert path.takes_grid and not TeacherSpecificAdapterPath(8, depth=2, levels=[1]).takes_grid
    emb, outs = torch.randn(2, 7, 8), [torch.randn(2, 7, 8) for _ in range(2)]
    path(emb, outs, TokenGrid(1, 2, 3))
    assert [a.seen for a in path.adapters] == [[TokenGrid(1, 2, 3)]] * 3
    with pytest.raises(ValueError, match="_GridRecorder takes the token grid"):
        path(emb, outs)


class _NoRatio(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()


class _Narrowing(torch.nn.Module):
    def __init__(self, dim: int, down_ratio: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim // down_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_a_plugin_adapter_that_breaks_the_contract_is_named(monkeypatch):
    """Not a TypeError from inside the path's constructor, nor a size mismatch at the next addition."""
    monkeypatch.setitem(ADAPTERS._entries, "no_ratio", _NoRatio)
    monkeypatch.setitem(ADAPTERS._entries, "narrowing", _Narrowing)
    with pytest.raises(
        ValueError, match=r"adapter 'no_ratio' \(_NoRatio\): the constructor must take \(dim, down_ratio\)"
    ):
        TeacherSpecificAdapterPath(8, depth=2, levels=[1], adapter="no_ratio")
    path = TeacherSpecificAdapterPath(8, depth=2, levels=[1], adapter="narrowing")
    with pytest.raises(ValueError, match=r"adapter _Narrowing turned tokens \(2, 7, 8\) into \(2, 7, 2\)"):
        path(torch.randn(2, 7, 8), [torch.randn(2, 7, 8) for _ in range(2)])


def test_student_hands_adapters_the_real_grid_of_non_square_images(monkeypatch):
    from sak.config import load_recipe

    monkeypatch.setitem(ADAPTERS._entries, "grid_recorder", _GridRecorder)
    recipe = load_recipe(
        TESTS / "tiny.yaml", ["teachers.1.adapter=grid_recorder", "student.model_kwargs.dynamic_img_size=true"]
    )
    teachers, tasks = build_teachers(recipe, torch.device("cpu")), build_tasks(recipe)
    student = build_student(recipe, teachers, tasks)
    student(torch.rand(2, 3, 32, 80))  # 2 x 5 patches of 16 px, and a class token
    assert {g for a in student.paths["vit_b"].adapters for g in a.seen} == {TokenGrid(1, 2, 5)}


def test_stem_refuses_images_its_patches_do_not_tile():
    """timm's patch embedding floors the grid: a 60 px side under 16 px patches would lose 12 px unseen."""
    stem = TeacherAgnosticStem("vit_small_patch16_224", 64, embed_dim=32, depth=1, num_heads=2, dynamic_img_size=True)
    assert stem.run(torch.rand(1, 3, 32, 48))[2] == (2, 3)
    with pytest.raises(ValueError, match="images of 32 x 60 px: the student's patch size 16 must divide both"):
        stem.run(torch.rand(1, 3, 32, 60))


def test_grad_checkpointing_keeps_less_for_backward_and_gives_the_same_gradients():
    """student.grad_checkpointing recomputes the stem's blocks in backward (drop path replayed): the same loss
    and gradients, bit for bit, with the blocks' activations no longer kept from the forward."""
    from sak.config import load_recipe

    results = {}
    for on in (False, True):
        recipe = load_recipe(
            TESTS / "tiny_multitask.yaml",
            [f"student.grad_checkpointing={str(on).lower()}", "student.model_kwargs.drop_path_rate=0.2"],
        )
        torch.manual_seed(0)
        teachers, tasks = build_teachers(recipe, torch.device("cpu")), build_tasks(recipe)
        student = build_student(recipe, teachers, tasks).train()
        assert student.stem.grad_checkpointing is on and all(p.grad_checkpointing is on for p in student.paths.values())
        assert not student.stem.vit.grad_checkpointing  # (timm's own switch, for its forward, is left alone)
        batch = next(iter(build_dataset_loader(recipe)))
        targets = teacher_targets(teachers, batch["image"], None)
        x = student.preprocess(batch["image"])
        # what the stem's blocks keep: the whole stem's less its patch embedding's (image, weights)
        kept = (
            saved_bytes(lambda s=student, x=x: s.stem.run(x))[0]
            - saved_bytes(lambda s=student, x=x: s.stem.embed(x))[0]
        )
        with torch.no_grad():
            embedded, outs, _ = student.stem.run(x)
        path, embedded = student.paths["vit_a"], embedded.requires_grad_()
        kept_path = saved_bytes(lambda p=path, e=embedded, o=outs: p(e, o))[0]
        torch.manual_seed(1)  # the same drop-path and router noise draws in both runs
        out = student(batch["image"])
        loss = compute_losses(out, targets, batch, tasks, build_distill_loss(recipe), recipe.loss.alpha).total
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results[on] = kept, loss.detach(), grads, kept_path
    (kept_plain, loss_plain, grads_plain, path_plain) = results[False]
    (kept_ckpt, loss_ckpt, grads_ckpt, path_ckpt) = results[True]
    b, n, d = x.shape[0], 1 + (64 // 16) ** 2, 32  # tiny_multitask: 64 px, patch 16, a class token, width 32
    block_inputs = 4 * b * n * d * 4  # what checkpointing keeps: each of the 4 blocks' float32 input
    assert kept_ckpt <= block_inputs < kept_plain / 4, (kept_ckpt, block_inputs, kept_plain)
    # recomputed, an adapter path keeps each of its 5 adapters' input, and its 4 level norms' input, statistics
    # (mean and 1 / std per token) and affine weights
    token_map = b * n * d * 4
    assert path_ckpt <= 9 * token_map + 4 * (2 * b * n + 2 * d) * 4 < path_plain / 1.5, (path_ckpt, path_plain)
    assert torch.equal(loss_plain, loss_ckpt) and grads_plain.keys() == grads_ckpt.keys()
    for name, g in grads_plain.items():
        assert torch.equal(g, grads_ckpt[name]), name
    with torch.no_grad():  # evaluation: nothing to recompute, no checkpoint
        assert saved_bytes(lambda: student(batch["image"]))[0] == 0


def build_dataset_loader(recipe):
    from sak.engine.build import build_loader

    return build_loader(recipe, recipe.data.split, train=True)


def build(multitask=True, *overrides):
    from sak.config import load_recipe

    recipe = load_recipe(TESTS / ("tiny_multitask.yaml" if multitask else "tiny.yaml"), list(overrides))
    teachers = build_teachers(recipe, torch.device("cpu"))
    tasks = build_tasks(recipe)
    return recipe, teachers, tasks, build_student(recipe, teachers, tasks)


def test_shapes_and_parameter_report():
    recipe, teachers, tasks, student = build()
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    out = student(images)
    assert set(out.features) == {"vit_a", "vit_b"}
    assert [f.shape for f in out.features["vit_a"]] == [(2, 48, 4, 4)] * 4
    assert [f.shape for f in out.features["vit_b"]] == [(2, 40, 4, 4)] * 4
    assert out.tasks["semseg"].shape == (2, 5, 64, 64) and out.tasks["normals"].shape == (2, 3, 64, 64)
    report = parameter_report(student)
    parts = ["tas", "tsap.vit_a", "tsap.vit_b", "aligners", "routers", "heads"]
    assert sum(report[p] for p in parts) == report["total"] == sum(p.numel() for p in student.parameters())
    assert report["inference"] == report["total"] - report["aligners"]


def test_the_student_refuses_float_images_out_of_0_1_as_the_teachers_do():
    """Called from Python with float images of 0..255, it gave the predictions of a white image without a word."""
    student = build()[3].eval()
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\], got values in \[0, 255\]"):
        student(images.float())
    with torch.no_grad():
        torch.testing.assert_close(student(images).tasks["semseg"], student(images.float() / 255).tasks["semseg"])


@pytest.mark.parametrize("model", ["vit_small_patch16_224", "vit_base_patch16_siglip_224"])
def test_gradients_reach_every_student_part_and_no_teacher(model):
    """Also for a ViT with an attention-pooling head (SigLIP's `global_pool="map"`), which the stem drops: its
    parameters took no part in the loss, and DDP stops at the second step on parameters without gradients."""
    recipe, teachers, tasks, student = build(True, f"student.model={model}")
    student.train()
    dataset = build_dataset("synthetic", DatasetSpec(image_size=64, tasks=tuple(tasks)), {"length": 4})
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    targets = teacher_targets(teachers, batch["image"], None)
    losses = compute_losses(student(batch["image"]), targets, batch, tasks, build_distill_loss(recipe), 1.0)
    losses.total.backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient: {missing[:10]}"
    for teacher in teachers.values():
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        teacher.train()
        assert not teacher.training


def test_levels_must_match_between_student_and_teacher():
    stem = TeacherAgnosticStem("vit_small_patch16_224", 32, embed_dim=16, depth=4, num_heads=2)
    with pytest.raises(ValueError, match="returns 3 levels but the student has 4"):
        SAKStudent(stem, [TeacherSlot("t", (16, 16, 16))], {})


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stage1_then_stage2_lowers_every_loss_and_starts_from_stage1(tiny_recipe, tmp_path, capsys):
    stage1 = tiny_recipe("run.name=s1", "schedule.max_steps=10")
    train(stage1)
    stage2 = tiny_recipe(
        "run.name=s2", "schedule.max_steps=25", f"checkpoint.init_from={stage1.run_dir}", "eval.at_start=true",
        path=TESTS / "tiny_multitask.yaml",
    )  # fmt: skip
    capsys.readouterr()
    train(stage2)
    weights = stage1.run_dir / "checkpoints" / "step_00000010" / "model.safetensors"  # (said: it was silent)
    said = f"[sak] student weights from '{weights}' (checkpoint.init_from); new here, not in them: heads, routers"
    assert said in capsys.readouterr().out
    log = rows(stage2.run_dir)
    before = log[0]
    assert before["step"] == 0 and log[-1]["step"] == 25
    steps = [r for r in log if "loss" in r]  # training rows; BatchNorm statistics make 25-step val noisy
    for key in (k for k in steps[0] if k.startswith(("task/", "distill/"))):
        first, last = (sum(r[key] for r in part) / 5 for part in (steps[:5], steps[-5:]))
        assert last < first, key
    s1_val = [r for r in rows(stage1.run_dir) if "val/distill/vit_a" in r][-1]
    # stage 2 starts where stage 1 ended: same held-out distillation loss before any stage-2 step
    assert before["val/distill/vit_a"] == pytest.approx(s1_val["val/distill/vit_a"], rel=1e-5)


def test_vit_b_student_with_three_base_teachers_at_512_has_the_public_sak_parameter_counts():
    """Counts derived by hand from the public SAK architecture (ViT-B/16 TAS without final norm; per
    teacher 13 adapters of 768 -> 192 -> 768 plus a scale, 4 output LayerNorms; no aligners as all
    widths are 768; MoR per (level, task): 768 -> 384, LayerNorm, 384 -> 2 * 4; heads as SAK)."""
    stem = TeacherAgnosticStem("vit_base_patch16_384", 512)
    tasks = {"semseg": 21, "parts": 7, "saliency": 2, "normals": 3, "edges": 1}  # saliency: 2-class softmax
    model = SAKStudent(stem, [TeacherSlot(n, (768,) * 4) for n in ("dinov2", "clip", "sam")], tasks)
    report = parameter_report(model)
    d, r = 768, 192
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert report["tas"] == (3 * 16 * 16 * d + d) + d + (1 + 32 * 32) * d + 12 * block == 86_433_024
    adapter = (d * r + r) + (r * d + d) + 1
    assert report["tsap.dinov2"] == 13 * adapter + 4 * 2 * d == 3_852_493
    router = (d * d // 2 + d // 2) + 2 * (d // 2) + (d // 2 * 8 + 8)
    assert report["routers"] == 4 * 5 * router == 5_982_880
    head = 4 * (d * d // 4 + d // 4) + (d * d * 9 + d) + 2 * d
    assert report["heads"] == 5 * head + sum((d + 1) * c for c in tasks.values()) == 29_532_706
    assert report["aligners"] == 0 and report["total"] == 133_506_089


def test_freeze_options_and_lora_choose_what_learns():
    from sak.config import load_recipe

    def trainable(*overrides, path=TESTS / "tiny_multitask.yaml"):
        recipe = load_recipe(path, list(overrides))
        teachers = build_teachers(recipe, torch.device("cpu"))
        student = build_student(recipe, teachers, build_tasks(recipe))
        return {n for n, p in student.named_parameters() if p.requires_grad}, student

    names, _ = trainable("student.freeze=stem")
    assert names and not any(n.startswith("stem.") for n in names)
    names, _ = trainable("student.freeze=all_but_routers")
    assert names and all(n.startswith(("routers.", "heads.")) for n in names)
    lora = "student.lora={r: 4, lora_alpha: 8, target_modules: [qkv]}"
    names, student = trainable(lora, path=TESTS / "tiny.yaml")  # stage 1: only LoRA in the stem
    stem = {n for n in names if n.startswith("stem.")}
    assert stem and all("lora_" in n for n in stem) and any(n.startswith("paths.") for n in names)
    names, _ = trainable(lora)  # stage 2: the whole stem plus LoRA
    assert "stem.vit.blocks.0.attn.qkv.base_layer.weight" in names and any("lora_" in n for n in names)
    for path in (TESTS / "tiny.yaml", TESTS / "tiny_multitask.yaml"):  # a fixed stem trains its LoRA (it froze it)
        names, _ = trainable(lora, "student.freeze=stem", path=path)
        stem = {n for n in names if n.startswith("stem.")}
        assert stem and all("lora_" in n for n in stem)


def test_recomputing_adapters_leaves_batch_norm_statistics_as_one_forward_does(monkeypatch):
    """student.grad_checkpointing ran each adapter again in backward, in training mode: a plug-in adapter with
    batch norm updated its running statistics twice a step. Such adapters are not recomputed."""

    class Normed(torch.nn.Module):
        def __init__(self, dim: int, down_ratio: int = 4) -> None:
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.norm(x.transpose(1, 2)).transpose(1, 2)

    monkeypatch.setitem(ADAPTERS._entries, "normed", Normed)
    stats = []
    for recompute in (False, True):
        torch.manual_seed(0)
        path = TeacherSpecificAdapterPath(8, 2, [0, 1], adapter="normed").train()
        path.grad_checkpointing = recompute
        x = torch.randn(2, 5, 8, requires_grad=True)
        sum(o.sum() for o in path(x, [torch.randn(2, 5, 8) for _ in range(2)])).backward()
        stats.append({k: v.clone() for k, v in path.state_dict().items() if "running" in k or "batches" in k})
    assert stats[0].keys() == stats[1].keys() and stats[0]
    for key in stats[0]:
        torch.testing.assert_close(stats[0][key], stats[1][key], rtol=0, atol=0, msg=key)


def test_decode_head_convolutions_run_channels_last_and_compute_what_nchw_computes():
    """The heads' 3x3 convolutions at 1/4 resolution are most of a stage-2 step: their inputs are channels-last
    by construction (tokens (B, N, C) -> (B, C, h, w) is an NHWC view, and interpolate / cat keep it), which
    is the layout cuDNN's and oneDNN's fast convolution kernels take; this guards that layout."""
    from sak.student.heads import DecodeHead

    torch.manual_seed(0)
    head = DecodeHead(dim=32, num_levels=4, channels=5)
    levels = [torch.randn(2, 36, 32) for _ in range(4)]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for m in (head.fuse[0], head.classifier)]
    out = head(levels, (6, 6), (48, 48))
    for h in hooks:
        h.remove()
    assert [x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in seen] == [True] * 2
    # the same head on NCHW inputs (what a channels-first implementation would run) gives the same logits
    plain = head.classifier(head.fuse(seen[0].contiguous()).contiguous())
    fast = head.classifier(head.fuse(seen[0]))
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    assert out.shape == (2, 5, 48, 48)


def test_tasks_mix_their_experts_together_as_each_router_would_alone():
    """SAKStudent.mix stacks a level's experts once and mixes them for the tasks whose routers weight each
    image in one product, and for those weighting each token (the noisy routers in training, pixel routers) in
    another: the same mixtures and gradients as each router's own forward, noise included (drawn in the same
    order), in float64; plug-in routers with their own forward are called alone."""

    class Doubling(NoisyRouter):  # a plug-in router with its own mixing: called as it is
        def forward(self, tas, experts):
            return 2 * experts[-1]

    _, _, tasks, student = build()
    student = student.double().train()
    names = list(student.heads)
    assert len(names) >= 3
    student.routers[names[1]] = torch.nn.ModuleList(PixelRouter(32, 3).double() for _ in range(4))
    student.routers[names[2]][0] = Doubling(32, 3).double()
    torch.manual_seed(0)
    tas = [torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    experts = [[t] + [torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True) for _ in range(2)] for t in tas]
    leaves = [e for level in experts for e in level]

    torch.manual_seed(1)
    got = student.mix(tas, experts)
    torch.manual_seed(1)
    want = {task: [r(tas[j], experts[j]) for j, r in enumerate(student.routers[task])] for task in student.heads}
    assert set(got) == set(want) == set(names)
    torch.testing.assert_close(got[names[2]][0], 2 * experts[0][-1])
    flat_got = [m for task in names for m in got[task]]
    flat_want = [m for task in names for m in want[task]]
    for a, b in zip(flat_got, flat_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grads = [torch.randn_like(m) for m in flat_got]
    params = [p for p in student.routers.parameters()]
    got_grads = torch.autograd.grad(flat_got, leaves + params, grads, allow_unused=True)
    want_grads = torch.autograd.grad(flat_want, leaves + params, grads, allow_unused=True)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # in evaluation the noisy routers weight each image: the per-image product, as each router alone
    student.eval()
    got = student.mix(tas, experts)
    for task in names:
        for j, router in enumerate(student.routers[task]):
            torch.testing.assert_close(got[task][j], router(tas[j], experts[j]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("student", [SAKStudent, ManyToOneStudent])
@pytest.mark.parametrize(
    ("levels", "error"),
    [([3, 1, 2, 0], "distinct blocks in increasing order"), ([0, 1, 1, 3], "distinct blocks in increasing order"),
     ([0, 1, 2, -1], r"must index the stem's 4 blocks \(0..3\)"), ([0, 1, 2, 4], "must index the stem's 4 blocks")],
)  # fmt: skip
def test_levels_out_of_order_repeated_or_out_of_range_are_refused(student, levels, error):
    """The adapter paths hand out their levels in block order: any other order would mix, per level, the
    stem's features of one block with a path's of another. The many-to-one baseline checks alike (-1 cut its
    stem to 3 blocks and read block 2 twice; 4 failed in forward with an IndexError)."""
    stem = TeacherAgnosticStem("vit_small_patch16_224", 32, embed_dim=16, depth=4, num_heads=2)
    with pytest.raises(ValueError, match=error):
        student(stem, [TeacherSlot("t", (16,) * 4)], {}, levels=levels)
