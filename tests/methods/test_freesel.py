"""FreeSel data selection: patch filtering, per-image k-means, the samplers, budgets, manifests, `sak select`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from sak.data import apply_subset, build_dataset, read_manifest
from sak.data.base import DatasetSpec
from sak.methods import (
    ImageFolderPool,
    SelectionError,
)
from sak.methods.freesel import (
    PatternOptions,
    batched_kmeans,
    build_teacher,
    extract_features,
    image_uniforms,
    main,
    patch_tokens,
    preprocess_batch,
    semantic_patterns,
    top_share_mask,
    vit_of,
    vit_patch_tokens,
)

from ..conftest import REPO, TINY

TINY_KW = {"embed_dim": 32, "depth": 3, "num_heads": 2, "img_size": 64, "patch_size": 8}
TINY_VIT = [
    "--teacher",
    "timm",
    "--option",
    "model=vit_small_patch16_224",
    "--option",
    f"model_kwargs={json.dumps(TINY_KW)}",
]


def tiny_vit_teacher():
    """A random 3-block ViT with an 8 x 8 patch grid at 64 px."""
    return build_teacher(
        "timm", None, {"model": "vit_small_patch16_224", "model_kwargs": TINY_KW}, image_size=None, block=None
    )


@pytest.fixture
def png_pool(tmp_path):
    """12 PNGs of two sizes in two folders: 6 dark-noise images and 6 bright stripes."""
    root = tmp_path / "pool"
    (root / "stripes").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)).save(root / f"noise{i}.png")
        stripes = np.zeros((48, 48, 3), np.uint8)
        stripes[:, (i % 3) :: 4] = 255
        Image.fromarray(stripes).save(root / "stripes" / f"s{i}.png")
    return root


# ----------------------------------------------------------------------------------------------------
# Patch filtering
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("registers", [False, True])
def test_cls_attention_is_the_attention_the_last_block_computes(registers):
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch16_224"
    model = timm.create_model(name, pretrained=False, num_classes=0, **TINY_KW).eval()
    last = model.blocks[-1].attn
    last.fused_attn = False  # materialise the attention so that a hook can read it
    seen = {}
    last.attn_drop.register_forward_hook(lambda mod, inp, out: seen.setdefault("attn", out))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.forward_features(x)
        feats, attn = vit_patch_tokens(model, x, -2, with_attention=True)
    prefix = model.num_prefix_tokens
    expected = seen["attn"].mean(1)[:, 0, prefix:]  # head mean, CLS row, patch columns
    torch.testing.assert_close(attn, expected / expected.sum(1, keepdim=True))
    assert feats.shape == (2, 64, 32)
    with torch.no_grad():  # penultimate block output, after the final norm
        blocks = model.forward_intermediates(x, indices=[1], norm=False, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(feats, model.norm(blocks[0]))


@pytest.mark.parametrize(("block", "runs_last"), [(-2, False), (-1, True)])
def test_the_feature_pass_runs_no_block_after_those_it_reads(block, runs_last):
    """The last block was run whole for the default penultimate block (its CLS attention needs only its qkv)."""
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY_KW).eval()
    calls = []
    model.blocks[-1].register_forward_hook(lambda mod, inp, out: calls.append(1))
    with torch.no_grad():
        vit_patch_tokens(model, torch.randn(1, 3, 64, 64), block, with_attention=True)
    assert bool(calls) == runs_last


@pytest.mark.parametrize("share", [0.1, 0.5, 0.9, 1.0])
def test_top_share_mask_keeps_the_fewest_largest_patches_reaching_the_share(share):
    weights = torch.randn(6, 50).mul(2).softmax(-1)
    mask = top_share_mask(weights, share)
    for w, m in zip(weights, mask, strict=True):
        kept = w[m]
        assert kept.sum() >= share - 1e-6
        assert kept.sum() - kept.min() < share, "one patch fewer must fall short of the share"
        if (~m).any():
            assert kept.min() >= w[~m].max()


def test_attention_filter_on_a_vit_teacher_keeps_half_the_cls_attention():
    teacher = tiny_vit_teacher()
    x = teacher.preprocess(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
    feats, weights, used, _ = patch_tokens(teacher, x, PatternOptions())
    assert used == "attention" and feats.shape == (3, 64, 32)
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    kept = torch.where(top_share_mask(weights, 0.5), weights, 0).sum(1)
    assert (kept >= 0.5 - 1e-6).all() and (kept < 0.5 + weights.max(1).values).all()


def test_teachers_without_cls_attention_use_feature_norms():
    teacher = build_teacher(
        "timm", None, {"model": "convnext_atto", "model_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}},
        image_size=64, block=None,
    )  # fmt: skip
    x = teacher.preprocess(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    feats, weights, used, _ = patch_tokens(teacher, x, PatternOptions())
    assert used == "norm" and feats.shape == (2, 4, 16)  # deepest level: stride 32 on 64 px
    torch.testing.assert_close(weights, feats.norm(dim=-1))
    with pytest.raises(SelectionError, match="not a timm VisionTransformer"):
        patch_tokens(teacher, x, PatternOptions(filter="attention"))
    with pytest.raises(SelectionError, match="not a ViT"):
        build_teacher("timm", None, {"model": "convnext_atto"}, image_size=64, block=-1)


def test_a_vit_without_prefix_tokens_gets_patterns_by_feature_norms():
    # (SigLIP's ViTs have no class token: timm gives their patches alone, not a (patches, prefix) pair)
    kwargs = {**TINY_KW, "class_token": False, "global_pool": "avg"}
    teacher = build_teacher("timm", None, {"model": "vit_tiny_patch16_224", "model_kwargs": kwargs}, 64, block=-2)
    x = teacher.preprocess(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
    feats, weights, used, _ = patch_tokens(teacher, x, PatternOptions())
    assert used == "norm" and feats.shape == (3, 64, 32)
    torch.testing.assert_close(weights, feats.norm(dim=-1))
    patterns, global_feats, used = semantic_patterns(teacher, x, [0, 1, 2], PatternOptions())
    assert used == "norm" and [p.shape for p in patterns] == [(5, 32)] * 3 and global_feats.shape == (3, 32)


# teachers that keep their timm ViT inside a wrapper: dinov2 at .backbone.model, clip (timm) at .tower.model
DINOV2_KW = {"embed_dim": 32, "depth": 3, "num_heads": 2, "img_size": 56}
CLIP_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
WRAPPED_VITS = {
    "dinov2": ({"size": "small", "model_kwargs": DINOV2_KW}, "vit_small_patch14_dinov2", DINOV2_KW),
    "dinov2_registers": (
        {"size": "small", "registers": True, "model_kwargs": DINOV2_KW},
        "vit_small_patch14_reg4_dinov2",
        DINOV2_KW,
    ),
    "clip": ({"model_kwargs": CLIP_KW}, "vit_base_patch16_clip_384", CLIP_KW),
}


@pytest.mark.parametrize("variant", list(WRAPPED_VITS))
def test_wrapped_vit_teachers_get_freesels_method_as_the_timm_teacher_does(variant):
    options, timm_model, kwargs = WRAPPED_VITS[variant]
    torch.manual_seed(0)
    teacher = build_teacher(variant.split("_")[0], None, options, image_size=None, block=-2)  # a ViT: -2 accepted
    model = vit_of(teacher)
    assert model is not None and model.num_prefix_tokens == (5 if "registers" in variant else 1)
    plain = build_teacher("timm", None, {"model": timm_model, "model_kwargs": kwargs}, image_size=None, block=None)
    vit_of(plain).load_state_dict(model.state_dict())  # the same ViT behind the plain timm teacher
    side = teacher.input_size
    x = teacher.preprocess(torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8))
    feats, weights, used, valid = patch_tokens(teacher, x, PatternOptions(filter="attention"))
    ref_feats, ref_weights, ref_used, _ = patch_tokens(plain, x, PatternOptions())
    assert used == ref_used == "attention" and bool(valid.all())
    torch.testing.assert_close(feats, ref_feats)
    torch.testing.assert_close(weights, ref_weights)
    # the patches are the teacher's own tokens: its level of the penultimate block, after the final norm
    with torch.no_grad():
        level = teacher(x).levels[list(teacher.meta.levels).index(1)]
        torch.testing.assert_close(feats, model.norm(level.flatten(2).transpose(1, 2)))


def test_select_with_the_dinov2_teacher_records_attention_and_the_settings(png_pool, tmp_path):
    out = tmp_path / "dinov2.txt"
    teacher = ["--teacher", "dinov2", "--option", "size=small", "--option", f"model_kwargs={json.dumps(DINOV2_KW)}"]
    args = ["--pool", str(png_pool), "--budget", "3", *teacher, "--block", "-2", "--filter", "attention"]
    assert main([*args, "--image-size", "28", "--dtype", "bf16", "--no-progress", "--out", str(out)]) == 0
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert "filter=attention" in header[1] and "image_size=28" in header[1] and "dtype=bf16" in header[1]
    assert len(read_manifest(str(out))) == 3
    assert main([*args[:-4], "--no-progress", "--out", str(out)]) == 0  # the block not given: "default", not None
    assert "block=default k=5" in out.read_text().splitlines()[1]


def test_a_teacher_holding_two_vits_is_refused():
    class TwoTowers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = timm.create_model("vit_small_patch16_224", pretrained=False, **TINY_KW)
            self.b = timm.create_model("vit_small_patch16_224", pretrained=False, **TINY_KW)

    with pytest.raises(SelectionError, match="holds 2 timm VisionTransformers \\(a, b\\)"):
        vit_of(TwoTowers())


SAM_KW = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "window_size": 4,
          "global_attn_indexes": (1, 3), "out_chans": 16}  # fmt: skip


def test_letterbox_padding_tokens_are_left_out_of_patterns_and_global_features():
    torch.manual_seed(0)
    teacher = build_teacher("sam", None, {"model_kwargs": SAM_KW}, image_size=64, block=None)
    images = [
        torch.randint(0, 256, (3, 16, 64), dtype=torch.uint8),
        torch.randint(0, 256, (3, 64, 40), dtype=torch.uint8),
    ]
    sizes = [(16, 64), (64, 40)]
    x = preprocess_batch(teacher, images, torch.device("cpu"))  # longest side to 64, zeros right and below
    feats, weights, used, valid = patch_tokens(teacher, x, PatternOptions(), sizes=sizes)
    assert used == "norm"
    grid = valid.view(2, 8, 8)
    assert grid[0].sum(1).tolist() == [8, 8, 0, 0, 0, 0, 0, 0]  # 16 of 64 rows: the top 2 of 8 token rows
    assert grid[1].sum(0).tolist() == [8] * 5 + [0] * 3  # 40 of 64 columns: 5 token columns
    assert (weights[~valid] == 0).all()
    # keep everything, k above the token count: the patterns are exactly the image's tokens
    patterns, global_features, _ = semantic_patterns(teacher, x, [0, 1], PatternOptions(keep=1.0, k=64), sizes=sizes)
    for b in range(2):
        torch.testing.assert_close(patterns[b], feats[b][valid[b]])
        torch.testing.assert_close(global_features[b], feats[b][valid[b]].mean(0))


def test_a_teacher_giving_nan_for_an_image_is_named_not_sampled_around():
    """A nan feature or filter weight (as fp16 can give on large models) is refused naming the image: it made
    every distance nan, or left the image without a kept patch ("every image needs at least one pattern")."""
    teacher = tiny_vit_teacher().eval()
    x = teacher.preprocess(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
    x[1, :, :8, :8] = float("nan")  # one patch of the second image
    with pytest.raises(SelectionError, match=r"gave non-finite features \(nan or inf\) for image\(s\) \['b'\]"):
        semantic_patterns(teacher, x, [0, 1, 2], PatternOptions(), ids=["a", "b", "c"])
    with pytest.raises(SelectionError, match=r"for image\(s\) \[1\] computed in float16: try --dtype fp32"):
        semantic_patterns(teacher, x, [0, 1, 2], PatternOptions(), dtype=torch.float16)


# ----------------------------------------------------------------------------------------------------
# Per-image k-means
# ----------------------------------------------------------------------------------------------------
def test_kmeans_gives_k_patterns_or_all_kept_patches_when_fewer():
    torch.manual_seed(0)
    x = torch.randn(4, 30, 8)
    mask = torch.zeros(4, 30, dtype=torch.bool)
    for b, n in enumerate([30, 12, 5, 3]):
        mask[b, :n] = True
    patterns = batched_kmeans(x, mask, k=5, uniforms=image_uniforms([0, 1, 2, 3], 5, seed=0))
    assert [len(p) for p in patterns] == [5, 5, 5, 3]
    torch.testing.assert_close(patterns[3], x[3, :3])  # fewer kept patches than k: all of them
    torch.testing.assert_close(patterns[2].sort(0).values, x[2, :5].sort(0).values)
    for p, xb, mb in zip(
        patterns[:2], x[:2], mask[:2], strict=True
    ):  # a Lloyd fixed point: each centre is its cluster's mean
        points = xb[mb]
        assign = torch.cdist(points, p).argmin(1)
        for c in range(5):
            if (assign == c).any():
                torch.testing.assert_close(p[c], points[assign == c].mean(0), atol=1e-5, rtol=1e-5)


def test_kmeans_seeding_depends_on_seed_and_image_not_on_the_batch():
    torch.manual_seed(1)
    x, mask = torch.randn(3, 40, 6), torch.ones(3, 40, dtype=torch.bool)
    together = batched_kmeans(x, mask, 4, image_uniforms([7, 8, 9], 4, seed=3))
    alone = batched_kmeans(x[1:2], mask[1:2], 4, image_uniforms([8], 4, seed=3))
    torch.testing.assert_close(together[1], alone[0])
    assert not torch.equal(image_uniforms([8], 4, seed=3), image_uniforms([8], 4, seed=4))


# ----------------------------------------------------------------------------------------------------
# Pools
# ----------------------------------------------------------------------------------------------------
def test_folder_pool_ids_are_sorted_relative_paths(png_pool, tmp_path):
    pool = ImageFolderPool(png_pool)
    assert pool.ids == sorted([f"noise{i}" for i in range(6)] + [f"stripes/s{i}" for i in range(6)])
    assert pool[0]["image"].dtype == torch.uint8 and pool[0]["image"].shape == (3, 40, 40)
    (png_pool / "noise0.jpg").write_bytes((png_pool / "noise0.png").read_bytes())
    with pytest.raises(SelectionError, match="both have id 'noise0'"):
        ImageFolderPool(png_pool)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelectionError, match="no image files"):
        ImageFolderPool(tmp_path / "empty")
    with pytest.raises(SelectionError, match="neither a folder of images nor a recipe"):
        ImageFolderPool(tmp_path / "missing")


def test_folder_pool_lists_and_decodes_as_the_image_folder_dataset(png_pool, tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png_pool / "anim.gif")  # not an image_folder extension
    linked = tmp_path / "elsewhere"
    linked.mkdir()
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(linked / "deep.png")  # 16-bit grey, behind a symlinked folder
    (png_pool / "linked").symlink_to(linked, target_is_directory=True)
    pool = ImageFolderPool(png_pool)
    folder = build_dataset("image_folder", DatasetSpec(root=str(png_pool), image_size=8), {"split_subdir": False})
    assert pool.ids == folder.ids and "linked/deep" in pool.ids and "anim" not in pool.ids
    image = pool[pool.ids.index("linked/deep")]["image"]
    assert image[0].flatten().tolist() == np.rint(ramp.flatten() / 257).astype(int).tolist()  # not clipped at 255


def test_recipe_pools_give_the_unpadded_images_and_the_manifest_records_set(tmp_path, monkeypatch):
    from sak.data.fixtures import write_pascal_context
    from sak.data.images import decode_rgb
    from sak.methods import open_pool

    root = write_pascal_context(tmp_path / "PASCAL_MT", n_train=2, n_val=1, size=(48, 64))
    recipe = REPO / "recipes/sak/stage2_vits_pascal_context.yaml"
    overrides = [f"data.root={root}", "data.num_workers=0", "checkpoint.init_from=null"]
    pool, ids = open_pool(str(recipe), overrides)
    for index, image_id in enumerate(ids):  # evaluation samples are padded to 512 x 512: taken off again
        raw = decode_rgb(root / "JPEGImages" / f"{image_id}.jpg")
        assert pool[index]["image"].permute(1, 2, 0).numpy().tolist() == raw.tolist()
    out = tmp_path / "subset.txt"
    sets = [item for o in overrides for item in ("--set", o)]
    assert main(["--pool", str(recipe), *sets, "--budget", "1", "--method", "random", "--out", str(out)]) == 0
    assert f"--set data.root={root}" in out.read_text().splitlines()[0]
    # the data section as resolved (a relative root made absolute): the recipe file may change after
    monkeypatch.chdir(tmp_path)
    sets[sets.index(f"data.root={root}")] = "data.root=PASCAL_MT"
    assert main(["--pool", str(recipe), *sets, "--budget", "1", "--method", "random", "--out", str(out)]) == 0
    assert out.read_text().splitlines()[2] == (
        f"# data: name=pascal_context root={root} split=train subset=None options={{}}"
    )
    assert main(["--pool", "PASCAL_MT/JPEGImages", "--budget", "1", "--method", "random", "--out", str(out)]) == 0
    assert out.read_text().splitlines()[2] == f"# pool folder: {root / 'JPEGImages'}"


# ----------------------------------------------------------------------------------------------------
# The feature pass and the command
# ----------------------------------------------------------------------------------------------------
def test_features_do_not_depend_on_the_batch_size(png_pool):
    teacher, pool = tiny_vit_teacher(), ImageFolderPool(png_pool)
    small, used = extract_features(teacher, pool, PatternOptions(k=3), batch_size=5, progress=False)
    large, _ = extract_features(teacher, pool, PatternOptions(k=3), batch_size=12, progress=False)
    assert used == "attention" and [f.id for f in small] == pool.ids
    for a, b in zip(small, large, strict=True):
        assert 1 <= len(a.patterns) <= 3
        torch.testing.assert_close(a.patterns, b.patterns, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.global_feature, b.global_feature, atol=1e-5, rtol=1e-5)


def test_select_command_end_to_end_on_a_folder_of_pngs(png_pool, tmp_path, capsys):
    out = tmp_path / "manifest.txt"
    args = ["--pool", str(png_pool), "--budget", "4", *TINY_VIT, "--k", "3", "--batch-size", "5", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    ids = read_manifest(str(out))
    assert len(ids) == len(set(ids)) == 4 and set(ids) <= set(ImageFolderPool(png_pool).ids)
    printed = capsys.readouterr()
    assert "freesel, filter attention" in printed.out
    # the help said "default: its own" weights; without --weights the teacher's weights are random, and it says so
    assert "--teacher timm has no --weights: it runs with random weights" in printed.err
    assert main([*args, "--out", str(tmp_path / "again.txt")]) == 0
    assert read_manifest(str(tmp_path / "again.txt")) == ids, "same seed, same manifest"
    for method in ("farthest", "kcenter", "random"):
        assert main([*args, "--method", method, "--out", str(tmp_path / f"{method}.txt")]) == 0
        assert len(read_manifest(str(tmp_path / f"{method}.txt"))) == 4

    capsys.readouterr()
    weights = tmp_path / "tiny_vit.safetensors"  # the same ViT's weights in a local file: no warning
    save_file(timm.create_model("vit_small_patch16_224", num_classes=0, **TINY_KW).state_dict(), str(weights))
    tagged = [a.replace("model=vit_small_patch16_224", "model=vit_small_patch16_224.augreg_in1k") for a in args]
    assert main([*tagged, "--weights", str(weights), "--out", str(tmp_path / "file.txt")]) == 0
    assert "random weights" not in capsys.readouterr().err

    assert main([*args[:2], "--budget", "13", *args[4:], "--out", str(out)]) == 2
    assert "budget 13 is larger than the pool, which holds 12 images" in capsys.readouterr().err
    assert main(["--pool", str(png_pool), "--budget", "2", "--out", str(out)]) == 2
    assert "needs --teacher" in capsys.readouterr().err


def test_bad_ids_and_a_bad_out_are_refused_before_the_feature_pass(png_pool, tmp_path, monkeypatch, capsys):
    """They were found after the whole feature pass (or, for random, only when a bad id was picked)."""

    def no_features(*args, **kwargs):
        raise AssertionError("the feature pass ran")

    monkeypatch.setattr("sak.methods.select_command.extract_features", no_features)
    args = ["--pool", str(png_pool), "--budget", "2", *TINY_VIT, "--no-progress"]
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert "is a folder; give the manifest file's path" in capsys.readouterr().err
    (tmp_path / "ro").mkdir()  # (root may write anywhere: os.access says what a user's would)
    monkeypatch.setattr("sak.methods.selection.os.access", lambda p, mode: Path(p) != tmp_path / "ro")
    assert main([*args, "--out", str(tmp_path / "ro" / "m.txt")]) == 2
    assert f"no permission to write into '{tmp_path / 'ro'}'" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr("sak.methods.select_command.extract_features", no_features)
    (png_pool / "take#2.png").write_bytes((png_pool / "noise0.png").read_bytes())
    assert main([*args, "--method", "random", "--out", str(tmp_path / "m.txt")]) == 2
    assert "image id 'take#2' cannot be written" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--num-workers", "-1"], "--num-workers must be at least 0, got -1"),
        (["--image-size", "-16"], "--image-size must be a positive side in pixels, got -16"),
        (["--image-size", "0"], "--image-size must be a positive side in pixels, got 0"),
        (["--option", "model={x"], "--option 'model={x': the value is not valid YAML (expected ',' or '}'"),
        (["--option", "model_kwargs={depth:2}"], "--option model_kwargs: 'depth:2' is a key without a value"),
        (["--block", "7"], "--block 7 does not fit teacher timm: timm teacher vit_small_patch16_224: levels [7]"),
    ],
)
def test_bad_flags_are_one_line_before_the_teacher_is_built(flags, message, png_pool, tmp_path, capsys):
    """They failed in the DataLoader's or the teacher's words (naming no flag), ran with a negative size, or
    (an option's YAML) came as a traceback."""
    args = ["--pool", str(png_pool), "--budget", "2", *TINY_VIT, "--no-progress", "--out", str(tmp_path / "m.txt")]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_recipe_pool_of_unlabelled_images_gives_the_whole_photographs(tmp_path):
    """image_folder's evaluation transform centre-crops the short side: the teacher saw the middle third of a
    40 x 120 image. An unreadable image is an error naming it (skip_bad stood the next one in, under its id)."""
    from sak.methods import open_pool

    root = tmp_path / "photos"
    root.mkdir()
    thirds = np.zeros((40, 120, 3), np.uint8)
    thirds[:, :40], thirds[:, 80:] = 255, 128
    Image.fromarray(thirds).save(root / "a.png")
    Image.fromarray(thirds[:, ::-1]).save(root / "b.png")
    sets = ["data.name=image_folder", f"data.root={root}", "data.options={split_subdir: false, skip_bad: true}"]
    pool, ids = open_pool(str(TINY), sets)
    assert ids == ["a", "b"] and pool[0]["image"].permute(1, 2, 0).numpy().tolist() == thirds.tolist()
    (root / "c.png").write_bytes(b"\x89PNG broken")
    pool, _ = open_pool(str(TINY), sets)
    with pytest.raises(SelectionError, match=r"pool: cannot read image 'c'"):
        pool[2]


def test_a_stray_key_value_is_not_taken_for_a_set_override(png_pool, tmp_path, capsys):
    from sak.cli import main as sak_main

    with pytest.raises(SystemExit):
        sak_main(["select", "--pool", str(png_pool), "--budget", "2", "--out", str(tmp_path / "m.txt"), "a=b"])
    assert "unrecognized arguments: a=b" in capsys.readouterr().err


def test_the_module_command_reports_bad_input_as_sak_select_does(png_pool, tmp_path, capsys):
    """`python -m sak.methods.freesel` (what `accelerate launch -m` runs) printed tracebacks for an unknown
    teacher or a --seed numpy cannot take; it goes through `sak`'s own error reporting now."""
    args = ["--pool", str(png_pool), "--budget", "2", "--no-progress", "--out", str(tmp_path / "m.txt")]
    assert main([*args, "--teacher", "no_such_teacher"]) == 2
    assert "sak select: --teacher: unknown teacher 'no_such_teacher'; known: " in capsys.readouterr().err
    assert main([*args, "--method", "random", "--seed", str(2**32)]) == 2
    assert "--seed must be from 0 to 2**32 - 1, got 4294967296" in capsys.readouterr().err
    assert not (tmp_path / "m.txt").exists()


def test_an_error_in_a_loader_worker_is_one_line():
    from sak.methods.select_command import worker_message

    caught = SelectionError(
        "Caught SelectionError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        "  File \"x.py\", line 1, in f\n    raise\nsak.methods.selection.SelectionError: pool: cannot read image 'c'\n"
    )
    assert worker_message(caught) == "pool: cannot read image 'c'"
    assert worker_message(SelectionError("plain")) == "plain"


def test_select_command_on_a_recipe_pool(tmp_path):
    out = tmp_path / "subset.txt"
    args = ["--pool", str(TINY), "--set", "data.options.length=10", "--budget", "30%", *TINY_VIT, "--no-progress"]
    assert main([*args, "--method", "farthest", "--out", str(out)]) == 0
    dataset = build_dataset("synthetic", DatasetSpec(split="train", image_size=64), {"length": 10})
    ids = read_manifest(str(out))
    assert len(ids) == 3 and apply_subset(dataset.ids, str(out)) == ids


@pytest.mark.slow
def test_two_processes_select_what_one_process_selects(png_pool, tmp_path):
    """`accelerate launch` with a world of 2 CPU processes: each takes a shard, the features are gathered."""
    args = ["--pool", str(png_pool), "--budget", "5", *TINY_VIT, "--batch-size", "4", "--no-progress"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "sak.methods.freesel"]  # fmt: skip
    two = subprocess.run([*launch, *args, "--out", str(tmp_path / "two.txt")], cwd=REPO, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout
    assert main([*args, "--out", str(tmp_path / "one.txt")]) == 0
    assert read_manifest(str(tmp_path / "two.txt")) == read_manifest(str(tmp_path / "one.txt"))
