"""The SAM teacher: Meta's checkpoints through segment_anything and timm give the libraries' own block outputs."""

from functools import partial

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from skimage.data import astronaut
from torch import nn

from sak.teachers import TeacherSpec, create_teacher
from sak.teachers.sam import ENCODER_ARGS, SIZES
from sak.teachers.weights import WeightsError

# a tiny SAM encoder: 8 x 8 grid, windows of 4 in blocks 0 and 2, global attention in blocks 1 and 3
ENCODER = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 4,
    "num_heads": 2,
    "window_size": 4,
    "global_attn_indexes": (1, 3),
    "out_chans": 16,
}
TIMM = {**ENCODER, "neck_chans": ENCODER["out_chans"]}
TIMM.pop("out_chans")


def randomise(module: nn.Module) -> None:
    """Every parameter random: segment_anything zero-initialises pos_embed and the relative-position tables."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)


def tiny_sam(img_size: int = 64) -> Sam:
    encoder = ImageEncoderViT(
        **{**ENCODER, "img_size": img_size}, norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True
    )
    grid = img_size // ENCODER["patch_size"]
    prompt = PromptEncoder(
        embed_dim=16, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=4
    )
    decoder = MaskDecoder(
        transformer_dim=16, transformer=TwoWayTransformer(depth=1, embedding_dim=16, mlp_dim=32, num_heads=2)
    )
    return Sam(encoder, prompt, decoder).eval()


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    model = tiny_sam()
    randomise(model)
    assert model.image_encoder.pos_embed.abs().min() > 0 and model.image_encoder.blocks[1].attn.rel_pos_h.std() > 0.1
    return model


@pytest.fixture(scope="module")
def sam_file(sam, tmp_path_factory):
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny.pth"
    torch.save(sam.state_dict(), path)  # as Meta's files: the whole Sam, image_encoder.* / prompt_encoder.* / ...
    return path


def library_blocks(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """segment_anything's own forward, block outputs caught with hooks, as (B, C, h, w)."""
    outs = []
    handles = [b.register_forward_hook(lambda m, a, out: outs.append(out.permute(0, 3, 1, 2))) for b in encoder.blocks]
    with torch.no_grad():
        encoder(x)
    for h in handles:
        h.remove()
    return outs


def teacher(source: str, weights, image_size=None, **options):
    kwargs = ENCODER if source == "segment_anything" else TIMM
    return create_teacher(
        "sam", str(weights), spec=TeacherSpec(image_size=image_size), source=source, model_kwargs=kwargs, **options
    )


def test_meta_checkpoint_through_segment_anything_gives_its_block_outputs(sam, sam_file):
    t = teacher("segment_anything", sam_file)
    x = torch.randn(2, 3, 64, 64)
    out, expected = t(x), library_blocks(sam.image_encoder, x)
    assert t.meta.levels == (0, 1, 2, 3) and out.summary is None and t.meta.resize == "longest_pad"
    for a, b in zip(out.levels, expected, strict=True):
        assert a.shape == (2, 32, 8, 8)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert out.levels[-1].std() > 0.1 and t.meta.sha256 and t.meta.native_size == 64


def test_timm_safetensors_give_timms_own_intermediates(tmp_path):
    torch.manual_seed(1)
    ref = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0, **TIMM).eval()
    randomise(ref)
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    t = teacher("timm", tmp_path / "model.safetensors", timm_layer_norm_eps=1e-5)  # as the file's model was built
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=False, intermediates_only=True)
    for a, b in zip(t(x).levels, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # and timm's file also loads into segment_anything's encoder (timm names the MLP fc1 / fc2, SAM lin1 / lin2)
    assert len(teacher("segment_anything", tmp_path / "model.safetensors")(x).levels) == 4


@pytest.mark.parametrize("image_size", [None, 32, 80])
def test_same_checkpoint_through_timm_and_segment_anything_gives_the_same_features(sam_file, image_size):
    """At 32 / 80 px timm resamples pos_embed at run time; for segment_anything it is resampled once at load."""
    a, b = teacher("segment_anything", sam_file, image_size), teacher("timm", sam_file, image_size)
    s = image_size or 64
    x = torch.randn(2, 3, s, s)
    for la, lb in zip(a(x).levels, b(x).levels, strict=True):
        assert la.shape == (2, 32, s // 8, s // 8)
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=0)
    assert a.meta.native_size == b.meta.native_size == 64 and a.input_size == s


def test_timm_is_built_with_sams_layer_norm_eps(sam_file):
    """With the same weights, eps 1e-5 moves real SAM block outputs by up to ~7e-5; tiny random ones far less."""
    for eps in (1e-6, 1e-5):
        blocks = teacher("timm", sam_file, timm_layer_norm_eps=eps).tower.model.blocks
        norms = [m for m in blocks.modules() if isinstance(m, nn.LayerNorm)]
        assert len(norms) == 8 and all(m.eps == eps for m in norms)
    assert teacher("timm", sam_file).tower.model.blocks[0].norm1.eps == 1e-6  # the default
    torch.manual_seed(2)
    x = torch.randn(1, 3, 64, 64)
    reference = teacher("segment_anything", sam_file)(x).levels[-1]
    fixed, timm_default = (teacher("timm", sam_file, timm_layer_norm_eps=e)(x).levels[-1] for e in (1e-6, 1e-5))
    assert (fixed - reference).abs().max() * 2 < (timm_default - reference).abs().max()  # measured 5e-6 vs 1.5e-5


def test_preprocess_matches_segment_anythings_resize_normalise_and_pad(sam_file):
    """ResizeLongestSide (PIL bilinear, uint8) + Sam.preprocess (normalise, pad bottom / right with zeros)."""
    image = np.ascontiguousarray(astronaut()[:, :384])  # (512, 384, 3): resized to 1024 x 768, padded to 1024
    t = teacher("segment_anything", sam_file, image_size=1024)
    ours = t.preprocess(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
    resized = torch.from_numpy(ResizeLongestSide(1024).apply_image(image)).permute(2, 0, 1)[None].float()
    theirs = Sam.preprocess(tiny_sam(1024), resized)[0]
    assert ours.shape == theirs.shape == (3, 1024, 1024) and resized.shape[-2:] == (1024, 768)
    assert ours[:, :, 768:].abs().max() == 0 and theirs[:, :, 768:].abs().max() == 0
    diff = (ours - theirs)[:, :, :768].abs()  # PIL rounds to uint8: one level is 1 / 255 / 0.224 = 0.0175
    assert diff.max() < 0.02 and diff.mean() < 0.008, (diff.max(), diff.mean())  # measured 0.0175 / 0.0057


def test_official_builder_at_a_small_input():
    """Random ViT-B from segment_anything's registry, position embedding resampled from 64 x 64 to 2 x 2."""
    t = create_teacher("sam", spec=TeacherSpec(image_size=32), size="b")
    assert t.meta.levels == (2, 5, 8, 11) and t.level_shapes() == [(768, 2, 2)] * 4 and t.meta.native_size == 1024
    assert t.tower.encoder.pos_embed.shape == (1, 2, 2, 768)
    # a 20 x 30 image fills 21 of the 32 rows: 1 of the 2 token rows covers it (the other only padding)
    assert t.encode(torch.randint(0, 255, (1, 3, 20, 30), dtype=torch.uint8)).levels[0].shape == (1, 768, 1, 2)


@pytest.mark.slow
def test_official_sizes_agree_between_the_libraries_and_our_table():
    """timm's samvit_base_patch16 and an encoder from our argument table have segment_anything's vit_b layout."""
    b = create_teacher("sam", spec=TeacherSpec(image_size=32), size="b", source="timm")
    assert b.meta.levels == (2, 5, 8, 11) and b.level_shapes() == [(768, 2, 2)] * 4
    ours = ImageEncoderViT(**ENCODER_ARGS, **SIZES["b"], norm_layer=nn.LayerNorm).state_dict()
    official = sam_model_registry["vit_b"]().image_encoder.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in official.items()}


@pytest.mark.parametrize("source", ["segment_anything", "timm"])
def test_a_checkpoint_of_another_depth_names_the_options_sam_has(sam_file, source):
    """The misfit's hint said to check `model`, which SAM's teacher does not take."""
    kwargs = {**(ENCODER if source == "segment_anything" else TIMM), "depth": 2, "global_attn_indexes": (1,)}
    with pytest.raises(WeightsError, match=r"does not fit the model .*Check `size` / `model_kwargs` against"):
        create_teacher("sam", str(sam_file), source=source, model_kwargs=kwargs)


def test_frozen_and_eval_forever(sam_file):
    t = teacher("segment_anything", sam_file)
    t.train()
    assert not any(m.training for m in t.modules()) and not any(p.requires_grad for p in t.parameters())
    out = t.encode(torch.randint(0, 255, (1, 3, 50, 70), dtype=torch.uint8))
    assert out.levels[0].shape == (1, 32, 6, 8) and not out.levels[0].requires_grad  # 50 x 70: 6 of 8 rows image


def test_missing_files_wrong_checkpoints_and_offline_hub_are_clear_errors(sam, tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="sam_vit_b_01ec64.pth' does not exist"):
        create_teacher("sam", str(tmp_path / "sam_vit_b_01ec64.pth"))
    torch.save(sam.mask_decoder.state_dict(), tmp_path / "decoder.pth")
    with pytest.raises(WeightsError, match="decoder.pth' holds neither image_encoder"):
        create_teacher("sam", str(tmp_path / "decoder.pth"))
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}, tmp_path / "l.pth")
    with pytest.raises(WeightsError, match="l.pth' is SAM ViT-l, but size is 'b'"):
        create_teacher("sam", str(tmp_path / "l.pth"), size="b")
    torch.save({"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}, tmp_path / "sam2.pth")
    for source in ("segment_anything", "timm"):  # SAM 2's Hiera trunk: a KeyError before
        with pytest.raises(WeightsError, match=r"sam2.pth' holds an image encoder without SAM ViT's patch embedding"):
            create_teacher("sam", str(tmp_path / "sam2.pth"), source=source)
    with pytest.raises(WeightsError, match="segment_anything has no hub.*sam_vit_b_01ec64.pth"):
        create_teacher("sam", "sa1b")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="Hugging Face cache.*pass a local file instead: Meta's sam_vit_b"):
        create_teacher("sam", "sa1b", source="timm", model_kwargs=TIMM)
    # random weights download nothing: model_kwargs that build no model were reported as a failed download
    for weights in (None, "sa1b"):  # (timm builds before it downloads: the tag's failure was no download's)
        with pytest.raises(ValueError, match=r"model_kwargs .* do not build the model: RuntimeError: .*negative"):
            create_teacher("sam", weights, source="timm", model_kwargs={**TIMM, "mlp_ratio": -1.0})


def test_a_folder_named_as_the_tag_in_the_working_directory_is_named_not_an_isadirectoryerror(tmp_path, monkeypatch):
    """`weights: sa1b` run from a folder holding the SA-1B images (`sa1b/`): the name exists, so it is read as a
    path; that gave a raw IsADirectoryError from hashing the folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sa1b").mkdir()
    for source in ("segment_anything", "timm"):
        with pytest.raises(WeightsError, match=r"weights 'sa1b' is a directory; .*A bare name that exists in the "
                                               r"working directory is read as a path, not as a hub tag"):  # fmt: skip
            create_teacher("sam", "sa1b", source=source, model_kwargs=TIMM if source == "timm" else ENCODER)
    with pytest.raises(
        WeightsError, match=r"weights .*sa1b. is a directory; pass an existing local file .* or a hub tag$"
    ):
        create_teacher("sam", str(tmp_path / "sa1b"), model_kwargs=ENCODER)


@pytest.mark.parametrize("attention", ["folded", "flex"])
@pytest.mark.parametrize("source", ["segment_anything", "timm"])
def test_fused_relative_position_attention_equals_each_librarys_own(source, attention):
    """sam_attention folds the decomposed relative-position bias into the attention's dot product (or adds it
    in FlexAttention's score modification): both must give what segment_anything's hand-written and timm's
    masked attention give."""
    kwargs = {**(ENCODER if source == "segment_anything" else TIMM), "img_size": 64}
    if source == "segment_anything":
        kwargs["use_rel_pos"] = True
    spec = TeacherSpec(image_size=64)
    plain = create_teacher("sam", spec=spec, source=source, model_kwargs=kwargs, attention="library")
    randomise(plain)  # non-zero relative-position tables, so that the bias matters
    fused = create_teacher("sam", spec=spec, source=source, model_kwargs=kwargs, attention=attention)
    fused.load_state_dict(plain.state_dict())
    changed = [m for m in fused.modules() if type(m).__name__ == "Attention" and "forward" in vars(m)]
    assert len(changed) == ENCODER["depth"]  # windowed and global blocks alike
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for a, b in zip(plain.encode(x).levels, fused.encode(x).levels, strict=True):
        assert ((a - b).norm() / a.norm()).item() < 1e-5
    no_bias = create_teacher("sam", spec=spec, source=source, model_kwargs=kwargs, attention="library")
    no_bias.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for m in no_bias.modules():
            if hasattr(m, "rel_pos_h"):
                m.rel_pos_h.zero_()
    # the bias is really there: without it the features differ
    assert not torch.allclose(plain.encode(x).levels[-1], no_bias.encode(x).levels[-1], atol=1e-3)


@pytest.mark.parametrize(("size", "c", "scale"), [((14, 14), 64, 64**-0.5), ((8, 8), 48, 48**-0.5), ((5, 7), 8, 0.3)])
def test_rel_pos_attention_equals_the_bias_written_out_forward_and_backward(size, c, scale):
    """rel_pos_attention against SAM's formula written out: softmax(scale <q, k> + <q, Rh> + <q, Rw>) v, in
    float64. Widths with and without zero padding (14 x 14 x 64 pads 92 to 96; 8 x 8 x 48 is 64 already),
    a scale that is not a power of two, rectangular grids; gradients reach q, k, v and both tables."""
    from sak.teachers.sam_attention import rel_pos_attention

    h, w = size
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, h * w, c, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rh = torch.randn(h, h, c, generator=gen, dtype=torch.float64, requires_grad=True)
    rw = torch.randn(w, w, c, generator=gen, dtype=torch.float64, requires_grad=True)
    row, col = torch.arange(h * w) // w, torch.arange(h * w) % w
    bias = torch.einsum("bnqc,qkc->bnqk", q, rh[row][:, row]) + torch.einsum("bnqc,qkc->bnqk", q, rw[col][:, col])
    expected = torch.softmax(scale * q @ k.transpose(-1, -2) + bias, dim=-1) @ v
    cotangent = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(expected, (q, k, v, rh, rw), cotangent, retain_graph=True)
    for narrow_v in (False, True):  # v zero-padded to q's width (the teacher's on the CPU), or left c wide (on CUDA)
        got = rel_pos_attention(q, k, v, rh, rw, size, scale, narrow_v=narrow_v)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        have = torch.autograd.grad(got, (q, k, v, rh, rw), cotangent)
        for a, b in zip(have, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # FlexAttention: forward only (no backward on the CPU, and a teacher needs none), float32 (its CPU kernel
    # takes no float64). The three shapes run one after another in this process, each on its own compiled
    # kernel: the kernel that dynamic shapes gave after a change of shape returned wrong numbers and NaN.
    from sak.teachers.sam_attention import rel_pos_flex_attention

    with torch.no_grad():
        flex = rel_pos_flex_attention(*(t.float() for t in (q, k, v, rh, rw)), size, scale)
    torch.testing.assert_close(flex.double(), expected.detach(), rtol=1e-5, atol=2e-5)


def test_flex_attention_in_a_compiled_teacher_at_several_batch_sizes():
    """`attention: flex` under precision.compile_teachers: the teacher's graph breaks around FlexAttention,
    which runs its own kernel compiled per shape; features equal the library's at each batch size."""
    spec = TeacherSpec(image_size=64)
    plain = create_teacher("sam", spec=spec, source="timm", model_kwargs=TIMM, attention="library")
    randomise(plain)
    flex = create_teacher("sam", spec=spec, source="timm", model_kwargs=TIMM, attention="flex")
    flex.load_state_dict(plain.state_dict())
    flex.compile()
    for batch in (2, 3, 2):
        x = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        for a, b in zip(plain.encode(x).levels, flex.encode(x).levels, strict=True):
            assert ((a - b).norm() / a.norm()).item() < 1e-5


def test_attention_option_names_its_choices():
    """An unknown kernel lists the three; the boolean this option replaced points at it."""
    spec = TeacherSpec(image_size=64)
    with pytest.raises(ValueError, match="options.attention: 'fast' is not one of 'folded', 'flex', 'library'"):
        create_teacher("sam", spec=spec, source="timm", model_kwargs=TIMM, attention="fast")
    with pytest.raises(ValueError, match="unknown key 'sam.options.fused_attention'; did you mean 'attention'"):
        create_teacher("sam", spec=spec, source="timm", model_kwargs=TIMM, fused_attention=False)


@pytest.mark.parametrize("hw", [(48, 64), (80, 40), (64, 64), (20, 64), (1, 400)])
def test_maps_of_non_square_images_are_cut_to_the_tokens_that_cover_the_image(sam_file, hw):
    """SAM letterboxes (longest side to 64 px here, zeros right and below): `encode` keeps the rows and columns
    of its 8 x 8 grid whose centres lie in the image, so that the student's maps (the image only) are not
    matched to padding; `map_shapes` says which shapes those are, for the feature cache."""
    t = teacher("segment_anything", sam_file)
    images = torch.rand(2, 3, *hw)
    full = t(t.preprocess(images)).levels
    # 20 px -> 2.5 rows; 1 x 400 px -> 0.16 px, kept as 1 (rounded to 0 rows, the resize stopped)
    expected = {(48, 64): (6, 8), (80, 40): (8, 4), (64, 64): (8, 8), (20, 64): (3, 8), (1, 400): (1, 8)}[hw]
    got = t.encode(images).levels
    assert [tuple(level.shape[1:]) for level in got] == t.map_shapes(hw) == [(32, *expected)] * 4
    for a, b in zip(got, full, strict=True):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b[..., : expected[0], : expected[1]], atol=0, rtol=0)
    assert t.map_shapes((64, 64)) == t.level_shapes()
