"""SAK's dense augmentation, evaluation padding and the stage-1 crops (sak/data/transforms.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sak.data.transforms import (
    IMAGENET_MEAN_UINT8,
    DenseAugment,
    dense_eval_transform,
    dense_train_transform,
    hflip,
    hsv_uint8_to_rgb,
    max_class_ratio,
    pad,
    photometric_distortion,
    random_crop,
    random_resized_crop_box,
    resize_sample,
    rgb_to_hsv_uint8,
    to_tensors,
    to_uint8,
    unpad,
)


def make_sample(h: int = 40, w: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(h, w, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    semseg = np.zeros((h, w), dtype=np.int64)
    semseg[:, w // 2 :] = 3
    semseg[: h // 4] = 255
    parts = np.zeros((h, w), dtype=np.int64)
    parts[h // 2 :, : w // 3] = 2
    return {
        "image": rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8),
        "semseg": semseg,
        "parts": parts,
        "normals": normals.astype(np.float32),
        "depth": rng.uniform(0.5, 5.0, size=(h, w)).astype(np.float32),
        "edges": (rng.random((h, w)) < 0.1).astype(np.float32),
    }


def test_resize_keeps_labels_unit_normals_and_scales_depth():
    s = make_sample()
    out = resize_sample(s, (80, 120), depth_scale=2.0)
    assert out["image"].shape == (80, 120, 3) and out["semseg"].shape == (80, 120)
    assert set(np.unique(out["semseg"])) == {0, 3, 255}  # nearest: no blended labels
    assert set(np.unique(out["edges"])) <= {0.0, 1.0}
    np.testing.assert_allclose(np.linalg.norm(out["normals"], axis=-1), 1.0, atol=1e-5)
    # nearest for targets: output pixel (2i, 2j) reads source pixel (i, j) at an exact 2x enlargement
    np.testing.assert_array_equal(out["normals"][::2, ::2], s["normals"])
    np.testing.assert_allclose(out["depth"][::2, ::2], s["depth"] / 2.0)


def test_flip_mirrors_everything_and_negates_normal_x():
    s = make_sample()
    f = hflip(s)
    np.testing.assert_array_equal(f["image"], s["image"][:, ::-1])
    np.testing.assert_array_equal(f["semseg"], s["semseg"][:, ::-1])
    np.testing.assert_array_equal(f["normals"][..., 0], -s["normals"][:, ::-1, 0])
    np.testing.assert_array_equal(f["normals"][..., 1:], s["normals"][:, ::-1, 1:])
    np.testing.assert_array_equal(hflip(f)["normals"], s["normals"])


def test_cat_max_ratio_rejects_crops_dominated_by_one_class():
    label = np.ones((100, 100), dtype=np.int64)
    label[:, (np.arange(100) // 20) % 2 == 1] = 2  # 20-wide stripes: about 40% of 20x20 crops mix under 3:1
    sample = {"image": np.zeros((100, 100, 3), np.uint8), "semseg": label}

    def ratios(cat_max_ratio: float) -> list[float]:
        crops = [random_crop(sample, np.random.default_rng(s), (20, 20), cat_max_ratio) for s in range(40)]
        return [max_class_ratio(c["semseg"]) for c in crops]

    checked, free = ratios(0.75), ratios(1.0)
    assert all(r < 0.75 for r in checked)
    assert sum(r >= 0.75 for r in free) > 15  # without the check most crops are dominated by one class
    assert max_class_ratio(np.array([[1, 1, 255, 255]])) == 1.0  # ignore does not count as a class


def test_crop_without_a_satisfying_window_still_has_the_crop_size():
    sample = {"image": np.zeros((50, 50, 3), np.uint8), "semseg": np.ones((50, 50), np.int64)}
    assert random_crop(sample, np.random.default_rng(0), (20, 30), 0.75)["semseg"].shape == (20, 30)
    small = random_crop(sample, np.random.default_rng(0), (64, 64), 0.75)  # smaller than the crop: kept whole
    assert small["image"].shape == (50, 50, 3)


def test_pad_centres_with_ignore_values_and_unpad_recovers():
    s = make_sample(30, 50)
    p = pad(s, (40, 64))
    assert p["image"].shape == (40, 64, 3)
    top, left = 5, 7
    np.testing.assert_array_equal(p["image"][0, 0], IMAGENET_MEAN_UINT8)
    assert (p["semseg"][:top] == 255).all() and (p["edges"][:, :left] == 255).all()
    assert (p["normals"][:top] == 0).all() and (p["depth"][:, :left] == 0).all()
    t = to_tensors(p)
    assert torch.equal(unpad(t["image"], (30, 50)), torch.from_numpy(s["image"]).permute(2, 0, 1))
    np.testing.assert_array_equal(unpad(p["semseg"], (30, 50)), s["semseg"])
    with pytest.raises(ValueError, match="larger than the padded map"):
        unpad(p["semseg"], (41, 50))


def test_eval_transform_rejects_images_larger_than_the_canvas():
    with pytest.raises(ValueError, match="larger than the evaluation size"):
        dense_eval_transform(make_sample(40, 60), (32, 64))


def test_a_target_of_another_size_or_a_channels_first_image_is_refused():
    """A label saved at twice the image's size was cropped at the image's coordinates: half its pixels wrong,
    without a word; a smaller one or a (3, H, W) image failed in numpy's indexing."""
    aug = DenseAugment(crop_size=(32, 32))
    sample = make_sample(40, 60)
    big = {**sample, "semseg": np.kron(sample["semseg"], np.ones((2, 2), dtype=np.int64))}
    message = r"semseg is \(80, 120\) and its image \(40, 60, 3\): each target must be \(40, 60\)"
    with pytest.raises(ValueError, match=message):
        dense_train_transform(big, np.random.default_rng(0), aug)
    with pytest.raises(ValueError, match=message):
        dense_eval_transform(big, (64, 64))
    with pytest.raises(ValueError, match=r"normals is \(40, 60\) .* must be \(40, 60, 3\)"):
        dense_eval_transform({**sample, "normals": sample["depth"]}, (64, 64))
    with pytest.raises(ValueError, match=r"image is \(3, 40, 60\); the transforms take \(H, W, 3\)"):
        dense_train_transform({"image": sample["image"].transpose(2, 0, 1)}, np.random.default_rng(0), aug)


def test_a_plug_in_tasks_target_made_known_goes_through_the_pipeline_as_a_label():
    """A plug-in target was an unknown key (the module dict FILL edited by hand the only way round), and
    to_tensors turned an (H, W, C) one into (1, H, W, C)."""
    from sak.data.transforms import FILL, add_target

    sample = make_sample(40, 60)
    flow = np.stack(np.mgrid[0:40, 0:60], axis=-1).astype(np.int64)  # (H, W, 2): each pixel's own (row, col)
    with pytest.raises(KeyError, match=r"unknown target\(s\) \['test_flow'\].*add_target\(name, fill\)"):
        dense_eval_transform({**sample, "test_flow": flow}, (64, 64))
    add_target("test_flow", 255)
    try:
        add_target("test_flow", 255)  # (a module imported again)
        with pytest.raises(ValueError, match="already a target with fill 255"):
            add_target("test_flow", 0)
        with pytest.raises(ValueError, match="'semseg' is already a target"):
            add_target("semseg", 0)
        with pytest.raises(ValueError, match="'image' is the sample's picture, not a target"):
            add_target("image", 0)
        add_target("test_nan_fill", float("nan"))  # (NaN, never equal to itself, was "already a target" at once)
        add_target("test_nan_fill", float("nan"))
        del FILL["test_nan_fill"]
        aug = DenseAugment(crop_size=(48, 72), scale_range=(1.0, 1.0), photometric=False)
        out = dense_train_transform({**sample, "test_flow": flow}, np.random.default_rng(3), aug)
        tensors = to_tensors(out)
        assert tensors["test_flow"].shape == (2, 48, 72) and tensors["test_flow"].dtype == torch.int64
        content = out["test_flow"][4:44, 6:66]  # (centred in the larger crop; the rest is the fill)
        assert (out["test_flow"][:4] == 255).all() and np.array_equal(content[..., 0], flow[..., 0])
        cols = content[0, :, 1]
        assert np.array_equal(cols, np.arange(60)) or np.array_equal(cols, np.arange(60)[::-1])  # (maybe mirrored)
        with pytest.raises(ValueError, match=r"test_flow is \(40, 59, 2\) .* must be \(40, 60, 2\)"):
            dense_eval_transform({**sample, "test_flow": flow[:, 1:]}, (64, 64))
    finally:
        del FILL["test_flow"]


def test_parts_without_any_part_pixel_become_all_ignore():
    s = make_sample()
    s["parts"][:] = 0
    out = dense_eval_transform(s, (48, 64))
    assert (out["parts"] == 255).all()
    s = make_sample()
    assert set(np.unique(dense_eval_transform(s, (48, 64))["parts"])) == {0, 2, 255}


def test_train_transform_is_a_function_of_the_generator():
    aug = DenseAugment(crop_size=(32, 32))
    a = dense_train_transform(make_sample(), np.random.default_rng([0, 0, 3]), aug)
    b = dense_train_transform(make_sample(), np.random.default_rng([0, 0, 3]), aug)
    c = dense_train_transform(make_sample(), np.random.default_rng([0, 1, 3]), aug)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        assert a[key].shape[:2] == (32, 32)
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].dtype == np.uint8


def test_photometric_distortion_matches_opencv_hsv_units():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    round_trip = hsv_uint8_to_rgb(rgb_to_hsv_uint8(image)).astype(int)
    assert np.abs(round_trip - image).max() <= 5  # uint8 HSV keeps hue in 2-degree steps
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    hsv = rgb_to_hsv_uint8(red)
    assert hsv.tolist() == [[[0, 255, 255]]]  # OpenCV: H in [0, 180), S and V in [0, 255]
    hsv[..., 0] = 60  # +120 degrees
    assert hsv_uint8_to_rgb(hsv).tolist() == [[[0, 255, 0]]]
    outs = [photometric_distortion(image, np.random.default_rng(s)) for s in range(8)]
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)
    assert sum(not np.array_equal(o, image) for o in outs) >= 6  # each step fires with probability 1/2
    np.testing.assert_array_equal(outs[3], photometric_distortion(image, np.random.default_rng(3)))


def test_hsv_to_rgb_truncates_as_opencv():
    """cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) of these uint8 HSV values (OpenCV 4.10); rounding gave one more grey
    level in one channel of each (a third of all values, the training images about 0.3 levels brighter)."""
    hsv = np.array([[[120, 188, 40], [144, 222, 42], [4, 218, 207], [145, 14, 80], [84, 216, 130]]], np.uint8)
    opencv = [[[10, 10, 40], [34, 5, 42], [207, 53, 30], [79, 75, 80], [19, 130, 107]]]
    assert hsv_uint8_to_rgb(hsv).tolist() == opencv


def test_photometric_distortion_goes_through_hsv_every_time_as_the_reference():
    """The reference converts to HSV and back whether or not saturation or hue is drawn; the uint8 round trip
    changes some values. With every other step neutral, no output is the input (a quarter of them were)."""
    image = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    round_trip = hsv_uint8_to_rgb(rgb_to_hsv_uint8(image))
    assert not np.array_equal(round_trip, image)
    neutral = {"brightness_delta": 0, "contrast_range": (1.0, 1.0), "saturation_range": (1.0, 1.0), "hue_delta": 1}
    for seed in range(12):  # hue_delta 1 draws a shift of -1 or 0
        assert not np.array_equal(photometric_distortion(image, np.random.default_rng(seed), **neutral), image)


def test_random_resized_crop_box_respects_scale_and_bounds():
    for seed in range(50):
        top, left, h, w = random_resized_crop_box(120, 200, np.random.default_rng(seed), (0.3, 0.6), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 200
        assert 0.25 <= h * w / (120 * 200) <= 0.65
        assert 0.7 <= w / h <= 1.4
    # an extreme aspect ratio falls back to the centre crop clamped to the ratio range
    assert random_resized_crop_box(10, 400, np.random.default_rng(0), (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 193, 10, 13)


def test_nearest_resize_picks_the_source_pixel_cv2_picks():
    """cv2.INTER_NEAREST computes floor(dst * (1 / (out / in))); floor(dst * (in / out)) differs from it where
    the product should be whole: width 698 -> 1348 maps column 674 to 349 in cv2, to 348 that way."""
    from sak.data.transforms import resize_sample

    label = np.arange(698, dtype=np.int64)[None].repeat(2, axis=0)
    out = resize_sample({"image": np.zeros((2, 698, 3), np.uint8), "semseg": label}, (2, 1348))
    assert out["semseg"][0, 674] == 349


def on_one_and_two_threads(make):
    """`make()` run with torch on 1 thread (a loader worker) and on 2 (the main process): the two results."""
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(make())
    finally:
        torch.set_num_threads(threads)
    return outs


def test_the_rescaled_image_does_not_depend_on_the_number_of_threads():
    """A loader worker runs torch on one thread, the main process on several: torch's CPU bilinear kernel rounds
    differently with the count, which in float32 (4.6e-5 here) moved a few training pixels by a grey level
    between the two; in float64 the difference is at the last bits."""
    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    outs = on_one_and_two_threads(lambda: resize_sample({"image": image}, (523, 697))["image"])
    assert np.abs(outs[0] - outs[1]).max() < 1e-9


def test_the_rescaled_image_is_truncated_to_uint8_as_the_reference_casts_it():
    """The reference casts the rescaled float image with astype(np.uint8); rounding made it half a grey level
    brighter on average. A value a hair below an integer (float error) is that integer, not the one below."""
    image = np.array([[[0.2, 1.7, 2.9999999999], [254.5, 255.4, -0.3]]])
    assert to_uint8(image).tolist() == [[[0, 1, 3], [254, 255, 0]]]


def test_the_rescaled_training_pixels_do_not_depend_on_the_number_of_threads():
    """...nor do the pixels made of it: a value that should be exactly k + 0.5 sat ~1e-14 above or below it with
    the count, and rounding to uint8 took it up or down (four pixels here; truncation has the same edge at k)."""
    image = np.random.default_rng(2).integers(0, 256, (150, 254, 3), dtype=np.uint8)
    outs = on_one_and_two_threads(lambda: to_uint8(resize_sample({"image": image}, (145, 246))["image"]))
    assert np.array_equal(outs[0], outs[1])
