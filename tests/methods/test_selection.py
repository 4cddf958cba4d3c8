"""The samplers over pattern sets (FreeSel's d^2 sampling, farthest-point, k-center, random), budgets and
manifests: sak/methods/selection.py without a teacher."""

from __future__ import annotations

import pytest
import torch

from sak.data import apply_subset, build_dataset, read_manifest
from sak.data.base import DatasetSpec
from sak.methods import (
    SelectionError,
    d2_sampling,
    farthest_point_sampling,
    kcenter_greedy,
    random_subset,
    resolve_budget,
    select_indices,
    write_manifest,
)
from sak.methods.freesel import main

from ..conftest import TINY
from .test_freesel import png_pool  # noqa: F401  (12 PNGs: a folder pool)


# ----------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------
def corners_and_centre() -> list[torch.Tensor]:
    """20 images with patterns near the origin, and 4 whose one pattern sits at a far corner."""
    g = torch.Generator().manual_seed(0)
    centre = [torch.randn(3, 2, generator=g) * 0.1 for _ in range(20)]
    corners = [torch.tensor([[sx * 10.0, sy * 10.0]]) for sx in (-1, 1) for sy in (-1, 1)]
    return centre + corners


@pytest.mark.parametrize("seed", range(4))
def test_farthest_point_picks_the_extreme_points(seed):
    order = farthest_point_sampling(corners_and_centre(), budget=5, seed=seed, metric="euclidean")
    assert {20, 21, 22, 23} <= set(order) and len(set(order)) == 5


def test_an_image_is_as_far_as_its_farthest_pattern():
    """After A, B (one pattern 7.07 away, one at 0) must beat C (4 away): the max rule, not the mean (3.5)."""
    sets = [torch.tensor([[0.0, 0.0], [0.1, 0.0]]), torch.tensor([[0.0, 0.1], [5.0, 5.0]]), torch.tensor([[4.0, 0.0]])]
    orders = [farthest_point_sampling(sets, 2, seed=s, metric="euclidean") for s in range(10)]
    after_a = [order[1] for order in orders if order[0] == 0]
    assert after_a and all(i == 1 for i in after_a)


def test_kcenter_greedy_picks_the_extreme_points_of_global_features():
    features = torch.cat([torch.randn(20, 2) * 0.1, torch.tensor([[9.0, 0.0], [-9.0, 0.0], [0.0, 9.0]])])
    assert {20, 21, 22} <= set(kcenter_greedy(features, 4, seed=2, metric="euclidean"))


def test_d2_sampling_is_reproducible_per_seed_and_differs_across_seeds():
    g = torch.Generator().manual_seed(0)
    patterns = [torch.randn(4, 16, generator=g) for _ in range(60)]
    first = d2_sampling(patterns, 15, seed=0)
    assert first == d2_sampling(patterns, 15, seed=0)
    assert len(set(first)) == 15
    others = {tuple(d2_sampling(patterns, 15, seed=s)) for s in range(1, 5)}
    assert len(others | {tuple(first)}) == 5
    assert d2_sampling(patterns, 8, seed=0) == first[:8], "a smaller budget is a prefix of a larger one"


def test_d2_sampling_favours_uncovered_images_and_handles_duplicates():
    far_hits = sum(20 in d2_sampling(corners_and_centre()[:20] + [torch.tensor([[30.0, 0.0]])], 2, seed=s,
                                     metric="euclidean") for s in range(20))  # fmt: skip
    assert far_hits >= 19
    same = [torch.ones(2, 3) for _ in range(5)]  # every distance zero after the first pick: uniform fallback
    assert sorted(d2_sampling(same, 5, seed=0)) == [0, 1, 2, 3, 4]


def test_a_duplicate_of_a_selected_image_is_at_distance_zero():
    """torch.cdist's matrix-product shortcut (taken past 25 points) left an exact copy of a selected image
    at distances of a few hundredths for features of realistic norm, instead of 0."""
    from sak.methods.selection import NearestSelected

    g = torch.Generator().manual_seed(0)
    patterns = [torch.randn(4, 384, generator=g) * 3 for _ in range(10)]
    patterns.append(patterns[3].clone())  # image 10 is image 3 again
    nearest = NearestSelected(patterns, "euclidean")
    nearest.add(3)
    assert nearest.image_distance()[10] == 0.0 and nearest.dist[40:].abs().max() == 0.0


def test_a_copy_of_a_selected_photo_gets_its_patterns_and_distance_zero(png_pool):  # noqa: F811
    """Each image's k-means was seeded by its pool position: a byte-identical copy of a selected image got other
    local optima and stayed as far from it as unrelated images, so d^2 sampling could pick it."""
    import shutil

    from sak.methods import ImageFolderPool
    from sak.methods.freesel import PatternOptions, extract_features
    from sak.methods.selection import NearestSelected

    from .test_freesel import tiny_vit_teacher

    shutil.copy(png_pool / "noise2.png", png_pool / "stripes" / "zz_copy.png")  # another folder, the pool's end
    pool = ImageFolderPool(png_pool)
    rows, _ = extract_features(tiny_vit_teacher(), pool, PatternOptions(k=4, keep=1.0), batch_size=5, progress=False)
    original, copy = pool.ids.index("noise2"), pool.ids.index("stripes/zz_copy")
    torch.testing.assert_close(rows[copy].patterns, rows[original].patterns, atol=1e-5, rtol=1e-5)
    nearest = NearestSelected([torch.nn.functional.normalize(r.patterns, dim=-1) for r in rows], "cosine")
    nearest.add(original)
    distances = nearest.image_distance()
    assert distances[copy] < 1e-5 and sorted(distances.tolist())[2] > 1e-3  # the others stay away


def test_random_subset_is_a_seeded_permutation_prefix():
    assert random_subset(50, 10, seed=1) == random_subset(50, 10, seed=1) != random_subset(50, 10, seed=2)
    assert random_subset(50, 5, seed=1) == random_subset(50, 10, seed=1)[:5]


# ----------------------------------------------------------------------------------------------------
# Budgets and manifests
# ----------------------------------------------------------------------------------------------------
def test_budget_as_count_or_percent_and_the_errors():
    assert resolve_budget("7", 20) == 7 and resolve_budget(20, 20) == 20
    assert resolve_budget("25%", 12) == 3 and resolve_budget("0.1%", 12) == 1
    # halves round up, exactly from the decimal text (round() would give 2 for 2.5: half to even)
    assert [resolve_budget("10%", n) for n in (25, 35, 24)] == [3, 4, 2]
    assert resolve_budget("12.5%", 20) == 3 and resolve_budget("0.5%", 300) == 2
    with pytest.raises(SelectionError, match=r"budget 21 is larger than the pool, which holds 20 images"):
        resolve_budget("21", 20)
    for bad, message in [("0", "at least one"), ("150%", r"\(0, 100\]"), ("many", "neither a count")]:
        with pytest.raises(SelectionError, match=message):
            resolve_budget(bad, 20)
    with pytest.raises(SelectionError, match="unknown selection method"):
        select_indices("coreset", 2, 5)


def test_manifest_round_trips_into_a_dataset_subset(tmp_path):
    dataset = build_dataset("synthetic", DatasetSpec(split="train", image_size=32), {"length": 20})
    chosen = random_subset(len(dataset.ids), 6, seed=0)
    path = write_manifest(tmp_path / "m.txt", [dataset.ids[i] for i in chosen], ["made by a test"])
    assert read_manifest(str(path)) == [dataset.ids[i] for i in chosen]
    assert apply_subset(dataset.ids, str(path)) == [dataset.ids[i] for i in chosen]
    with pytest.raises(SelectionError, match="cannot be written"):
        write_manifest(tmp_path / "bad.txt", ["a#b"])


def test_a_manifest_is_written_whole_with_commented_headers_and_ids_it_can_hold(tmp_path, monkeypatch):
    """A header with a line break wrote its second line as an id; an id with a carriage return read back as
    two; an id twice (skip_bad's stand-in) was kept; and a write cut short left a shorter manifest."""
    path = write_manifest(tmp_path / "m.txt", ["a", "b"], ["sak select --set data.options={length:\n  10}"])
    assert read_manifest(str(path)) == ["a", "b"] and path.read_text().count("# ") == 2
    for bad, why in ((["scan\rA"], "line breaks"), (["a", "b", "a"], r"id\(s\) \['a'\] to more than one image")):
        with pytest.raises(SelectionError, match=why):
            write_manifest(tmp_path / "bad.txt", bad)
    with pytest.raises(SelectionError, match="is a folder"):
        write_manifest(tmp_path, ["a"])

    def cut(src, dst):
        raise OSError(27, "File too large")

    monkeypatch.setattr("sak.methods.selection.os.replace", cut)
    with pytest.raises(OSError, match="File too large"):
        write_manifest(path, ["c", "d", "e"])
    assert read_manifest(str(path)) == ["a", "b"] and sorted(p.name for p in tmp_path.iterdir()) == ["m.txt"]


def test_non_finite_patterns_are_refused_naming_the_images():
    """One nan pattern made every distance nan: d^2 sampling fell back to uniform draws, farthest-point to
    the pool's order."""
    patterns = [torch.randn(2, 4) for _ in range(6)]
    patterns[3][1, 2] = float("nan")
    patterns[5][0, 0] = float("inf")
    for sampler in (d2_sampling, farthest_point_sampling):
        with pytest.raises(SelectionError, match=r"the patterns of image\(s\) \[3, 5\] .* not finite"):
            sampler(patterns, 3)


def test_d2_sampling_past_multinomials_categories_draws_the_same_distribution(monkeypatch):
    """torch.multinomial refuses more than 2**24 categories (a pool of 3.3 million images at k = 5): such
    pools are drawn by inverse CDF, never a pattern of zero weight, with the frequencies of the weights."""
    import sak.methods.selection as selection

    patterns = [torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0]])]
    monkeypatch.setattr(selection, "MULTINOMIAL_MAX", 2)  # 3 patterns: past it
    monkeypatch.setattr(selection, "_first", lambda n, g: 0)
    seconds = [d2_sampling(patterns, 2, seed=s, metric="euclidean")[1] for s in range(800)]
    share = seconds.count(2) / len(seconds)  # squared distances 1 and 9: image 2 with probability 0.9
    assert set(seconds) == {1, 2} and abs(share - 0.9) < 0.04, share
    assert sorted(d2_sampling([torch.ones(1, 2)] * 4, 4, seed=0)) == [0, 1, 2, 3]  # all zero: uniform fallback


def test_ids_a_utf8_manifest_cannot_hold_and_an_out_under_a_file_are_refused(tmp_path):
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python lists a Latin-1 file name
    with pytest.raises(SelectionError, match=r"image id 'caf\\udce9' is not valid text"):
        write_manifest(tmp_path / "m.txt", ["a", latin1])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SelectionError, match=r"lies under '.*afile', which is a file"):
        write_manifest(tmp_path / "afile" / "sub" / "m.txt", ["a"])
    path = write_manifest(tmp_path / "u.txt", ["été/ø"], [f"--pool /data/{latin1}"])  # UTF-8, whatever the locale
    assert path.read_bytes().decode("utf-8").endswith("été/ø\n") and read_manifest(str(path)) == ["été/ø"]
    (tmp_path / "latin1.txt").write_bytes("été\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"manifest '.*latin1.txt' is not UTF-8 text"):
        read_manifest(str(tmp_path / "latin1.txt"))


def test_a_manifest_is_never_written_onto_the_pool(png_pool, tmp_path, capsys):  # noqa: F811
    """--out onto a pool image replaced it with the manifest's text; onto the recipe used as the pool, or a split
    file under its data.root, replaced those."""
    recipe = tmp_path / "pool.yaml"
    recipe.write_text(TINY.read_text())
    sets = [
        "--set",
        "data.name=image_folder",
        "--set",
        f"data.root={png_pool}",
        "--set",
        "data.options={split_subdir: false}",
    ]
    image = png_pool / "noise0.png"
    before = {f: f.read_bytes() for f in (image, recipe)}
    for pool, out, extra in ((png_pool, image, []), (recipe, recipe, sets), (recipe, image, sets)):
        args = ["--pool", str(pool), *extra, "--method", "random", "--budget", "2", "--no-progress", "--out", str(out)]
        assert main(args) == 2
        assert f"--out {out} is (or is in) " in capsys.readouterr().err
    assert all(f.read_bytes() == data for f, data in before.items())
    for _ in range(2):  # a manifest written into the folder pool before is replaced (a rerun), not refused
        args = ["--pool", str(png_pool), "--method", "random", "--budget", "2", "--no-progress"]
        assert main([*args, "--out", str(png_pool / "selected.txt")]) == 0


def test_a_vit_filtered_by_norms_is_warned_of(png_pool, tmp_path, capsys):  # noqa: F811
    """`--filter auto` fell back to the norm filter on a ViT without a readable CLS attention silently; on a
    ViT those norms (after its final LayerNorm) are nearly equal and keep about half the patches regardless."""
    import json

    kwargs = {"embed_dim": 32, "depth": 3, "num_heads": 2, "img_size": 64, "patch_size": 8}
    teacher = ["--teacher", "timm", "--option", "model=vit_small_patch16_224", "--image-size", "64"]
    no_cls = {"class_token": False, "global_pool": "avg"}
    # (k-center takes the images' global features: no filter, no warning)
    for extra, method, warned in ((no_cls, "freesel", True), ({}, "freesel", False), (no_cls, "kcenter", False)):
        option = f"model_kwargs={json.dumps({**kwargs, **extra})}"
        args = ["--pool", str(png_pool), "--budget", "3", "--method", method, *teacher, "--option", option]
        assert main([*args, "--out", str(tmp_path / "m.txt")]) == 0
        err = capsys.readouterr().err
        assert ("is a ViT whose CLS attention cannot be read (the model has no CLS token)" in err) == warned, err
