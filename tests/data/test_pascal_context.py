"""PASCAL-Context (PASCAL_MT layout) read from a fixture written in the exact on-disk formats."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from scipy import ndimage

from sak.data import DatasetSpec, build_dataset
from sak.data.fixtures import CONTEXT_CLASSES, write_pascal_context
from sak.data.images import DataError
from sak.data.pascal_context import PERSON_PARTS, normals_valid_classes, read_human_parts
from sak.data.transforms import unpad
from sak.metrics.boundary import seg2bmap

TASKS = ("semseg", "parts", "saliency", "normals", "edges")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_pascal_context(tmp_path_factory.mktemp("pascal") / "PASCAL_MT", n_train=6, n_val=3, size=(48, 64))


@pytest.fixture
def copy(root, tmp_path):
    return shutil.copytree(root, tmp_path / "PASCAL_MT")


def dataset(root, split="train", train=False, tasks=TASKS, seed=0, subset=None, **options):
    spec = DatasetSpec(root=str(root), split=split, image_size=32, tasks=tasks, train=train, seed=seed, subset=subset)
    return build_dataset("pascal_context", spec, {"eval_size": [48, 64], **options})


def label_map(root, sample_id):
    return scipy.io.loadmat(root / "pascal-context" / "trainval" / f"{sample_id}.mat")["LabelMap"]


def test_reads_the_official_split_files(root):
    for split, n in (("train", 6), ("val", 3)):
        ds = dataset(root, split)
        assert ds.ids == (root / "ImageSets" / "Context" / f"{split}.txt").read_text().split()
        assert len(ds) == n


def test_eval_samples_have_every_target_with_the_contract_types(root):
    ds = dataset(root)
    for i in range(len(ds)):
        s = ds[i]
        image = np.array(Image.open(root / "JPEGImages" / f"{s['id']}.jpg"))
        assert s["size"].tolist() == list(image.shape[:2])
        assert s["image"].shape == (3, 48, 64) and s["image"].dtype == torch.uint8
        assert torch.equal(unpad(s["image"], s["size"]), torch.from_numpy(image).permute(2, 0, 1))
        assert s["semseg"].shape == (48, 64) and s["semseg"].dtype == torch.int64
        assert s["parts"].dtype == torch.int64 and s["saliency"].shape == (1, 48, 64)
        assert s["normals"].shape == (3, 48, 64) and s["edges"].dtype == torch.float32
        semseg = unpad(s["semseg"], s["size"])
        expected = np.asarray(Image.open(root / "semseg" / "pascal-context" / f"{s['id']}.png"))
        assert torch.equal(semseg, torch.from_numpy(expected.astype(np.int64)))
        assert set(torch.unique(s["saliency"]).tolist()) <= {0.0, 1.0, 255.0}
        assert set(torch.unique(unpad(s["edges"], s["size"])).tolist()) <= {0.0, 1.0}
        assert (s["semseg"][: (48 - s["size"][0]) // 2] == 255).all()  # padding is ignore


def test_parts_are_all_ignore_exactly_on_images_without_annotated_people(root):
    ds = dataset(root)
    seen = {True: 0, False: 0}
    for i in range(len(ds)):
        s = ds[i]
        objects = scipy.io.loadmat(root / "human_parts" / f"{s['id']}.mat")["anno"][0, 0]["objects"][0]
        annotated = any(int(o["class_ind"][0, 0]) == 15 and o["parts"].size > 0 for o in objects)
        parts = unpad(s["parts"], s["size"])
        seen[annotated] += 1
        if annotated:
            assert set(torch.unique(parts).tolist()) <= set(range(7)) and (parts > 0).any()
        else:
            assert (parts == 255).all()
    assert seen[True] and seen[False]  # the fixture holds both kinds


def test_human_parts_map_fine_names_to_six_parts_and_ignore_other_classes(tmp_path):
    def struct(rows, dtype):
        array = np.empty((1, len(rows)), dtype=dtype)
        for j, row in enumerate(rows):
            array[0, j] = row
        return array

    masks = {name: np.zeros((6, 8), np.uint8) for name in ("hair", "lhand", "ruleg", "rfoot", "neck", "cat_head")}
    for k, m in enumerate(masks.values()):
        m[k, :] = 1
    part = [("part_name", "O"), ("mask", "O")]
    person = struct([(n, masks[n]) for n in ("hair", "lhand", "ruleg", "rfoot", "neck")], part)
    cat = struct([("head", masks["cat_head"])], part)
    obj = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    objects = struct(
        [("person", np.array([[15.0]]), np.ones((6, 8), np.uint8), person),
         ("cat", np.array([[8.0]]), np.ones((6, 8), np.uint8), cat),
         ("person", np.array([[15.0]]), np.ones((6, 8), np.uint8), np.zeros((0, 0)))],
        obj,
    )  # fmt: skip
    scipy.io.savemat(tmp_path / "x.mat", {"anno": {"imname": "x.jpg", "objects": objects}})
    target = read_human_parts(tmp_path / "x.mat", (6, 8))
    assert target[:, 0].tolist() == [1, 4, 5, 6, 2, 0]  # head, lower arm, upper leg, lower leg, torso; cat ignored
    assert PERSON_PARTS["llarm"] == 4 and PERSON_PARTS["luleg"] == 5 and PERSON_PARTS["llleg"] == 6
    with pytest.raises(DataError, match="x.mat.*6x8"):
        read_human_parts(tmp_path / "x.mat", (7, 8))


def test_normals_are_unit_on_nyud_classes_and_zero_elsewhere(root):
    valid = normals_valid_classes(root / "json")
    assert CONTEXT_CLASSES["tvmonitor"] in valid and CONTEXT_CLASSES["wall"] in valid
    assert CONTEXT_CLASSES["sky"] not in valid and CONTEXT_CLASSES["unknown"] not in valid
    ds = dataset(root)
    n_valid = 0
    for i in range(len(ds)):
        s = ds[i]
        normals = unpad(s["normals"], s["size"]).numpy()
        norm = np.linalg.norm(normals, axis=0)
        shared = np.isin(label_map(root, s["id"]), valid)
        assert (norm[~shared] == 0).all()
        assert (np.abs(norm[shared] - 1) < 0.02).all()  # 8-bit PNG quantisation, as the real files
        n_valid += shared.sum()
    assert n_valid > 0


def test_edges_are_thinned_label_map_boundaries(root):
    ds = dataset(root, tasks=("edges",))
    for i in range(len(ds)):
        s = ds[i]
        edges = unpad(s["edges"][0], s["size"]).numpy() > 0
        labels = label_map(root, s["id"]).astype(np.int64)
        boundary = ndimage.grey_dilation(labels, size=3) != ndimage.grey_erosion(labels, size=3)
        assert edges.any() and not (edges & ~boundary).any()  # only on class boundaries
        assert edges.sum() < 0.75 * boundary.sum()  # thinned
        cross = ndimage.generate_binary_structure(2, 1)
        changes = np.zeros_like(edges)
        changes[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        changes[1:] |= labels[1:] != labels[:-1]
        covered = changes & ndimage.binary_dilation(edges, cross, iterations=2)
        assert covered.sum() > 0.95 * changes.sum()  # nearly every boundary has an edge (thinning trims ends)


def test_boundaries_are_scored_against_seism_seg2bmap_not_the_training_target(root):
    ds = dataset(root, split="val")
    for i in range(len(ds)):
        s = ds[i]
        training = unpad(s["edges"], s["size"])
        scored = ds.eval_target(s["id"], "edges", training)
        seism = seg2bmap(label_map(root, s["id"]))
        assert scored.dtype == torch.float32 and scored.shape == training.shape
        assert np.array_equal(scored[0].numpy() > 0, seism) and set(torch.unique(scored).tolist()) == {0.0, 1.0}
        assert not torch.equal(scored, training)  # the training target keeps the thinned Laplacian
        for task in ("semseg", "saliency"):
            target = unpad(s[task], s["size"])
            assert ds.eval_target(s["id"], task, target) is target


def test_a_one_bit_saliency_png_reads_as_the_eight_bit_one(copy):
    """Pillow gives a 1-bit PNG as bool: / 255 > 0.5 made every saliency map empty."""
    ref = dataset(copy, "val", tasks=("saliency",))[0]
    path = copy / "sal_distill" / f"{ref['id']}.png"
    Image.fromarray(np.asarray(Image.open(path)) > 127).convert("1").save(path)
    read = dataset(copy, "val", tasks=("saliency",))[0]["saliency"]
    assert Image.open(path).mode == "1" and unpad(ref["saliency"], ref["size"]).max() == 1
    assert torch.equal(read, ref["saliency"])


def test_an_eight_bit_zero_one_saliency_png_is_warned_of_once_per_folder(copy):
    """A 0/1 mask saved as 8 bits reads as 0 and 1/255: every pixel below 0.5, an empty saliency map."""
    ids = dataset(copy, "val", tasks=("saliency",)).ids
    for i in ids[:2]:
        path = copy / "sal_distill" / f"{i}.png"
        Image.fromarray((np.asarray(Image.open(path)) > 127).astype(np.uint8)).save(path)
    with pytest.warns(RuntimeWarning, match=rf"{ids[0]}.png: an 8-bit map whose values are all 0 or 1") as caught:
        for k in range(2):
            dataset(copy, "val", tasks=("saliency",))[k]
    assert len([w for w in caught if "values are all 0 or 1" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset(copy, "val", tasks=("saliency",))[2]  # a 0/255 map of the releases: no warning


def test_subset_manifest_keeps_the_listed_ids_in_order(root, tmp_path):
    ids = dataset(root).ids
    manifest = tmp_path / "subset.txt"
    manifest.write_text(f"# two images\n{ids[3]}\n{ids[0]}\n")
    assert dataset(root, subset=str(manifest)).ids == [ids[3], ids[0]]
    manifest.write_text("2099_000001\n")
    with pytest.raises(ValueError, match=f"are not among the {len(ids)} of split 'train' under '{root}'.*2099_000001"):
        dataset(root, subset=str(manifest))


def test_training_samples_are_equal_size_and_reproducible_per_seed_epoch_index(root):
    ds = dataset(root, train=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["parts"].shape == (3, 32, 32)
    first = ds[2]
    again = dataset(root, train=True)[2]  # a fresh dataset (another worker, a resumed run)
    assert all(torch.equal(first[k], again[k]) for k in TASKS + ("image",))
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["image"], first["image"])
    assert not torch.equal(dataset(root, train=True, seed=1)[2]["image"], first["image"])
    for i in range(len(ds)):
        s = ds[i]
        norm = s["normals"].norm(dim=0)
        assert ((norm == 0) | ((norm - 1).abs() < 0.02)).all()  # nearest resizing keeps unit normals
        assert set(torch.unique(s["semseg"]).tolist()) <= set(range(21)) | {255}


def test_unsupported_task_and_missing_split_are_clear_errors(root):
    with pytest.raises(ValueError, match="depth"):
        dataset(root, tasks=("depth",))
    with pytest.raises(FileNotFoundError, match="test.txt.*found splits"):
        dataset(root, split="test")


def test_bad_files_name_the_file_and_the_problem(copy):
    ids = dataset(copy).ids
    (copy / "JPEGImages" / f"{ids[0]}.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(copy / "semseg" / "pascal-context" / f"{ids[1]}.png")
    bad_class = np.asarray(Image.open(copy / "semseg" / "pascal-context" / f"{ids[2]}.png")).copy()
    bad_class[0, 0] = 37
    Image.fromarray(bad_class).save(copy / "semseg" / "pascal-context" / f"{ids[2]}.png")
    (copy / "sal_distill" / f"{ids[3]}.png").unlink()
    ds = None
    with pytest.raises(DataError, match=f"missing file.*sal_distill/{ids[3]}.png"):
        ds = dataset(copy)
    ds = dataset(copy, tasks=("semseg",))
    with pytest.raises(DataError, match=f"{ids[0]}.jpg: cannot decode"):
        ds[0]
    with pytest.raises(DataError, match=f"{ids[1]}.png: label is 5x5, the image is"):
        ds[1]
    with pytest.raises(DataError, match=r"class value\(s\) \[37\] out of range"):
        ds[2]
    kept = dataset(copy, skip_bad=True)
    assert kept.ids == ids[4:]
    assert [i for i, _ in kept.skipped] == ids[:4]
    assert "cannot decode" in kept.skipped[0][1] and "missing" in kept.skipped[3][1]
    manifest = copy / "subset.txt"  # skip_bad under data.subset: fewer samples than listed, not a refusal
    manifest.write_text("\n".join([ids[0], ids[4], ids[5]]) + "\n")
    assert dataset(copy, skip_bad=True, subset=str(manifest)).ids == [ids[4], ids[5]]


def test_a_person_part_without_its_mask_or_name_is_a_data_error_naming_the_file(copy):
    """A part struct without `mask` raised numpy's ValueError ("no field of name mask"), which neither named
    the file nor let skip_bad drop the sample."""
    from sak.data.pascal_context import read_human_parts

    path = copy / "human_parts" / "bad.mat"
    objects = np.empty((1, 1), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for fields, values in (([("part_name", "O")], ("head",)), ([("mask", "O")], (np.zeros((4, 4), np.uint8),))):
        parts = np.empty((1, 1), dtype=fields)
        parts[0, 0] = values
        objects[0, 0] = ("person", np.array([[15.0]]), np.zeros((4, 4), np.uint8), parts)
        scipy.io.savemat(path, {"anno": {"imname": "bad.jpg", "objects": objects}})
        with pytest.raises(DataError, match=r"bad.mat: part 0 of object 0 lacks `part_name` / `mask`"):
            read_human_parts(path, (4, 4))


def test_training_flip_mirrors_the_sample_and_negates_normal_x(root):
    """With scaling, cropping and colour changes switched off, a training sample is the evaluation
    sample, mirrored (normals' x negated) on the draws that flip."""
    plain = {"scale_range": [1.0, 1.0], "cat_max_ratio": 1.0, "photometric": False, "crop_size": [48, 64]}
    train, evaluation = dataset(root, train=True, **plain), dataset(root)
    flips = []
    for i in range(len(train)):
        t, e = train[i], evaluation[i]
        size = e["size"]
        image_t, image_e = unpad(t["image"], size), unpad(e["image"], size)
        flipped = not torch.equal(image_t, image_e)
        flips.append(flipped)
        if flipped:
            assert torch.equal(image_t, image_e.flip(-1))
            nt, ne = unpad(t["normals"], size), unpad(e["normals"], size).flip(-1)
            assert torch.equal(nt[0], -ne[0]) and torch.equal(nt[1:], ne[1:])
            assert torch.equal(unpad(t["semseg"], size), unpad(e["semseg"], size).flip(-1))
    assert any(flips) and not all(flips)


def test_image_at_is_the_samples_image_without_reading_the_other_targets(root, monkeypatch):
    """What a cache build reads: in training only semseg (it chooses the crop) beside the image."""
    for train in (True, False):
        full = dataset(root, train=train)
        for epoch in (0, 1):
            full.set_epoch(epoch)
            expected = [full[i]["image"] for i in range(len(full))]
            monkeypatch.setattr("sak.data.pascal_context.load_mat", lambda *a: pytest.fail("read a .mat"))
            monkeypatch.setattr("sak.data.pascal_context.read_human_parts", lambda *a: pytest.fail("read parts"))
            assert all(torch.equal(full.image_at(i), image) for i, image in enumerate(expected)), (train, epoch)
            monkeypatch.undo()
    crops = [torch.stack([d.image_at(i) for i in range(len(d))]) for d in (dataset(root, train=True, tasks=()),
                                                                         dataset(root, train=True))]  # fmt: skip
    assert not torch.equal(*crops)  # the semseg labels do move some of the fixture's crops


def test_an_exif_orientation_tag_does_not_turn_the_image_away_from_its_labels(copy):
    """The label maps are stored unrotated and the reference loaders ignore EXIF: the image is read as
    stored (it used to be turned upright, and then no longer matched its labels)."""
    ds = dataset(copy, split="val")
    sample_id = ds.ids[0]
    path = copy / "JPEGImages" / f"{sample_id}.jpg"
    stored = np.asarray(Image.open(path).convert("RGB"))
    assert stored.shape[0] != stored.shape[1]  # (a square image would be misaligned without an error)
    with Image.open(path) as im:
        exif = im.getexif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
        im.save(path, exif=exif, quality=95)
    sample = dataset(copy, split="val")[0]
    assert tuple(sample["size"].tolist()) == stored.shape[:2]


def test_a_scale_range_that_is_not_low_high_is_refused(root):
    for bad in ([2.0, 0.5], [0.0, 1.0], [1.0]):
        with pytest.raises(ValueError, match=r"data.options.scale_range .*0 < low <= high"):
            dataset(root, train=True, scale_range=bad)


def test_a_label_map_that_is_not_one_plane_and_a_split_file_that_is_not_utf8_are_named(copy):
    """A LabelMap holding a string (a 1-D array) was an IndexError inside the error message; a 3-D one numpy's
    "operands could not be broadcast"; a split file in Latin-1 a UnicodeDecodeError naming no file; and one
    with a byte-order mark listed its first id's files as missing."""
    ids = dataset(copy).ids
    mat = copy / "pascal-context" / "trainval" / f"{ids[0]}.mat"
    good = scipy.io.loadmat(mat)["LabelMap"]
    for value, shape in (
        ("hello", r"\(1,\)"),
        (np.stack([good, good], -1), rf"\({good.shape[0]}, {good.shape[1]}, 2\)"),
    ):
        scipy.io.savemat(mat, {"LabelMap": value})
        with pytest.raises(
            DataError, match=rf"{ids[0]}.mat: an array of shape {shape}, expected an \(H, W\) label map"
        ):
            dataset(copy)[0]
    scipy.io.savemat(mat, {"LabelMap": good})
    split = next((copy / "ImageSets" / "Context").glob("train.txt"))
    text = split.read_text()
    split.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert dataset(copy).ids == ids
    split.write_bytes(text.encode() + b"caf\xe9\n")
    with pytest.raises(DataError, match=rf"{split}: not UTF-8 text"):
        dataset(copy)
