"""The generated datasets (synthetic, package_images) honour data.subset like the file-backed ones."""

import dataclasses

import pytest
import torch

from sak.data import DatasetSpec, build_dataset
from sak.data.synthetic import SyntheticDataset
from sak.registry import DATASETS


def make(name, tmp_path=None, ids=None, train=True, **options):
    subset = None
    if ids is not None:
        subset = tmp_path / "subset.txt"
        subset.write_text("# chosen by sak select\n" + "\n".join(ids) + "\n")
    spec = DatasetSpec(split="train", image_size=32, tasks=("semseg",) if name == "synthetic" else (),
                       train=train, subset=None if subset is None else str(subset))  # fmt: skip
    return build_dataset(name, spec, options)


@pytest.mark.parametrize(
    ("name", "options"), [("synthetic", {"length": 10}), ("package_images", {"crops_per_image": 2})]
)
def test_subset_keeps_the_listed_samples_in_manifest_order_unchanged(name, options, tmp_path):
    full = make(name, **options)
    chosen = [full.ids[7], full.ids[2], full.ids[5]]
    part = make(name, tmp_path, chosen, **options)
    assert part.ids == chosen and len(part) == 3
    for k, sample_id in enumerate(chosen):
        a, b = part[k], full[full.ids.index(sample_id)]
        assert a["id"] == b["id"] == sample_id
        assert torch.equal(a["image"], b["image"])  # the same crop, flip and pixels as in the full split
        if name == "synthetic":
            assert torch.equal(a["semseg"], b["semseg"])


@pytest.mark.parametrize("name", ["synthetic", "package_images"])
def test_subset_with_an_unknown_id_names_the_manifest(name, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"data.subset .*subset.txt.*1 of its 1 id\(s\) are not among the \d+ of split 'train'.*nope.*another split or data.root",
    ):
        make(name, tmp_path, ["nope"])


def test_a_subset_listing_an_id_twice_is_an_error(tmp_path):
    """The sample would train twice and weigh twice in evaluation means (split files already refuse this)."""
    with pytest.raises(ValueError, match=r"subset.txt' lists 1 id\(s\) more than once, e.g. \['train_000001'\]"):
        make("synthetic", tmp_path, ["train_000001", "train_000001", "train_000002"])


@DATASETS.register("test_ignores_subset")
class IgnoresSubset(SyntheticDataset):
    """A plug-in that never applies data.subset: it trained on its whole split without a word."""

    def __init__(self, spec, options):
        super().__init__(dataclasses.replace(spec, subset=None), options)


def test_a_dataset_that_does_not_keep_the_subset_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"lists 2 id\(s\), and dataset 'test_ignores_subset' \(IgnoresSubset\) has "
                                         r"10 samples .*apply_subset\(ids, spec.subset, spec\)"):  # fmt: skip
        make("test_ignores_subset", tmp_path, ["train_000001", "train_000003"], length=10)


@DATASETS.register("test_channels_last")
class ChannelsLast(SyntheticDataset):
    """A plug-in's common slip: the image as numpy gives it, (H, W, 3)."""

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        return {**sample, "image": sample["image"].permute(1, 2, 0)}


def test_a_channels_last_image_is_named_before_a_teacher_meets_it(tiny_recipe):
    """It failed inside the first teacher: "The size of tensor a (32) must match the size of tensor b (3)"."""
    from sak.data.images import DataError
    from sak.engine import train

    with pytest.raises(DataError, match=r"ChannelsLast sample 'train_\d+': its 'image' is a Tensor of shape \(64, 64, 3\); "
                                        r"samples follow sak/data/base.py"):  # fmt: skip
        train(tiny_recipe("data.name=test_channels_last"))


@DATASETS.register("test_bad_samples")
class BadSamples(SyntheticDataset):
    """A plug-in whose transforms refuse sample 1 (a label at another size) and whose sample 2 lacks its semseg."""

    def __getitem__(self, index):
        if index == 1:
            raise ValueError("a dense sample's semseg is (80, 96) and its image (40, 48, 3)")
        sample = super().__getitem__(index)
        return {k: v for k, v in sample.items() if k != "semseg"} if index == 2 else sample


def test_a_plug_ins_refused_or_incomplete_sample_is_named_by_its_id():
    """A transform's refusal named no sample (which of thousands of files?); a missing target was a bare
    KeyError in the loss."""
    from sak.data.images import DataError
    from sak.engine.build import IndexedDataset

    spec = DatasetSpec(split="train", image_size=32, tasks=("semseg",), train=True)
    data = IndexedDataset(build_dataset("test_bad_samples", spec, {"length": 4}))
    assert data[0]["semseg"].shape == (32, 32)
    with pytest.raises(DataError, match=r"^BadSamples sample 'train_000001': ValueError: a dense sample's semseg is"):
        data[1]
    with pytest.raises(DataError, match=r"BadSamples sample 'train_000002' has no target for task\(s\) \['semseg'\]"):
        data[2]
