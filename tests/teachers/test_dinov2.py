"""The DINOv2 teacher from timm, transformers and Meta checkpoints (tiny random models in each library's own
format): each source gives its library's own features, the same weights give the same features whichever
library runs them at the native size, and at other sizes each source keeps its library's position-embedding rule."""

import hashlib
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from sak.teachers import TeacherSpec, create_teacher
from sak.teachers.base import normalize
from sak.teachers.dinov2 import variant_names
from sak.teachers.weights import WeightsError

TIMM_TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 56}
HF_TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "image_size": 56, "patch_size": 14}
GRID = 4  # 56 / 14
META_TOP = {  # transformers' save_pretrained names -> Meta's DinoVisionTransformer names (facebookresearch/dinov2)
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
META_BLOCK = {  # encoder.layer.N.<key> -> blocks.N.<key>; query / key / value are concatenated into attn.qkv
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",  # SwiGLU (ViT-g): Meta's fused w12 = [gate; up], w3 = down
    "mlp.weights_out": "mlp.w3",
}


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, including those the libraries initialise to zeros / ones / 1e-5."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def hf_reference(registers: bool = False, swiglu: bool = False, seed: int = 0):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**HF_TINY, num_register_tokens=4))
    else:  # SwiGLU at width 48: hidden (int(192 * 2 / 3) + 7) // 8 * 8 = 128, as timm's packed 5.33 ratio gives
        tiny = {**HF_TINY, "hidden_size": 48} if swiglu else HF_TINY
        model = Dinov2Model(Dinov2Config(**tiny, use_swiglu_ffn=swiglu))
    randomise(model, seed)
    return model.eval()


def hf_levels(model, x: torch.Tensor, levels=(0, 1, 2, 3)) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Block outputs straight from transformers: hidden_states[i + 1], patch tokens, reshaped with torch."""
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    side = x.shape[-1] // 14
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    maps = [out.hidden_states[i + 1][:, prefix:].transpose(1, 2).reshape(x.shape[0], -1, side, side) for i in levels]
    return maps, out.pooler_output


def meta_state_from_hf(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers model.safetensors rewritten with Meta's key names and layout."""
    out = {meta: hf[key] for key, meta in META_TOP.items() if key in hf}
    used = {key for key in META_TOP if key in hf}
    depth = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer."))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [f"{src}attention.attention.{n}.{kind}" for n in ("query", "key", "value")]
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([hf[k] for k in qkv])
            used.update(qkv)
        for key, meta in META_BLOCK.items():
            for suffix in ("", ".weight", ".bias"):
                if src + key + suffix in hf:
                    out[dst + meta + suffix] = hf[src + key + suffix]
                    used.add(src + key + suffix)
    assert used == set(hf), f"keys left unmapped: {sorted(set(hf) - used)}"
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same random weights as transformers' save_pretrained directory and as Meta's .pth, for a plain, a
    register and a SwiGLU (ViT-g style) model: {variant: (transformers model, folder)}."""
    made = {}
    for variant, kwargs in {"plain": {}, "registers": {"registers": True}, "swiglu": {"swiglu": True}}.items():
        root = tmp_path_factory.mktemp(variant)
        model = hf_reference(**kwargs, seed=len(made))
        model.save_pretrained(root / "hf")
        meta = meta_state_from_hf(load_file(str(root / "hf" / "model.safetensors")))
        torch.save(meta, root / f"dinov2_vitb14{'_reg4' if variant == 'registers' else ''}_pretrain.pth")
        made[variant] = (model, root)
    return made


def meta_file(root) -> str:
    return str(next(root.glob("*.pth")))


def assert_levels(out, maps, summary, atol):
    assert len(out.levels) == len(maps)
    for a, b in zip(out.levels, maps, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    torch.testing.assert_close(out.summary, summary, atol=atol, rtol=0)


def timm_levels(net, x):
    with torch.no_grad():
        final, maps = net.forward_intermediates(x, indices=[0, 1, 2, 3], norm=False)
    return maps, final[:, 0]


def test_sizes_name_each_librarys_model_and_levels_default_to_sak():
    assert variant_names("giant", False) == {
        "timm": "vit_giant_patch14_dinov2",
        "transformers": "facebook/dinov2-giant",
        "meta": "dinov2_vitg14",
    }
    assert variant_names("small", True)["timm"] == "vit_small_patch14_reg4_dinov2"
    assert variant_names("small", True)["transformers"] == "facebook/dinov2-with-registers-small"
    tiny = {"embed_dim": 32, "num_heads": 2, "img_size": 28}
    base, large = (create_teacher("dinov2", size=s, model_kwargs=tiny) for s in ("base", "large"))
    assert base.meta.levels == (2, 5, 8, 11) and large.meta.levels == (5, 11, 17, 23)
    assert large.meta.name == "vit_large_patch14_dinov2" and large.meta.source == "timm"
    hf_large = {**HF_TINY, "num_hidden_layers": 24}
    hf = create_teacher("dinov2", source="transformers", size="large", model_kwargs=hf_large)
    assert hf.meta.levels == (5, 11, 17, 23) and hf.meta.architecture == "transformers.Dinov2Model"
    default = create_teacher("dinov2", model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2})
    assert default.meta.native_size == 518 and default.level_shapes() == [(32, 37, 37)] * 2


def test_timm_safetensors_give_timms_own_intermediates(tmp_path):
    ref = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, **TIMM_TINY).eval()
    randomise(ref, 1)
    path = tmp_path / "model.safetensors"
    save_file(ref.state_dict(), str(path))
    teacher = create_teacher("dinov2", str(path), model_kwargs=TIMM_TINY)  # source inferred from timm's keys
    x = torch.randn(2, 3, 56, 56)
    assert_levels(teacher(x), *timm_levels(ref, x), atol=1e-5)
    m = teacher.meta
    assert (m.source, m.name, m.embed_dim, m.patch_size, m.native_size) == (
        "timm",
        "vit_base_patch14_dinov2",
        32,
        14,
        56,
    )
    assert m.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m.num_params == sum(p.numel() for p in ref.parameters())
    assert m.mean == (0.485, 0.456, 0.406) and m.std == (0.229, 0.224, 0.225)


def test_transformers_directory_and_both_key_namings_give_dinov2models_hidden_states(checkpoints, tmp_path):
    model, root = checkpoints["plain"]
    on_disk = load_file(str(root / "hf" / "model.safetensors"))
    # transformers 5 names its modules q/k/v/o_proj, but save_pretrained writes the older attention.attention.query
    assert "encoder.layer.0.attention.attention.query.weight" in on_disk
    assert "encoder.layer.0.attention.q_proj.weight" in model.state_dict()
    x = torch.randn(2, 3, 56, 56)
    maps, pooled = hf_levels(model, x)
    from_dir = create_teacher("dinov2", str(root / "hf"))  # config.json -> transformers
    assert from_dir.meta.source == "transformers" and from_dir.meta.native_size == 56
    assert from_dir.meta.sha256 == hashlib.sha256((root / "hf" / "model.safetensors").read_bytes()).hexdigest()
    assert_levels(from_dir(x), maps, pooled, atol=1e-5)
    save_file(model.state_dict(), str(tmp_path / "new_names.safetensors"))  # the in-memory naming, no config.json
    from_file = create_teacher("dinov2", str(tmp_path / "new_names.safetensors"), model_kwargs=HF_TINY)
    assert from_file.meta.source == "transformers"
    assert_levels(from_file(x), maps, pooled, atol=1e-5)


@pytest.mark.parametrize("variant", ["plain", "registers", "swiglu"])
def test_the_same_weights_give_the_same_features_through_every_library(checkpoints, variant):
    model, root = checkpoints[variant]
    kwargs = {**TIMM_TINY, "embed_dim": model.config.hidden_size}
    size = "giant" if variant == "swiglu" else "base"
    x = torch.randn(2, 3, 56, 56)
    maps, pooled = hf_levels(model, x)
    meta = create_teacher("dinov2", meta_file(root), size=size, model_kwargs=kwargs)  # Meta's keys -> meta
    via_timm = create_teacher("dinov2", meta_file(root), size=size, source="timm", model_kwargs=kwargs)
    via_hf = create_teacher("dinov2", str(root / "hf"))
    assert (meta.meta.source, via_timm.meta.source, via_hf.meta.source) == ("meta", "timm", "transformers")
    assert meta.meta.extra["registers"] == via_hf.meta.extra["registers"] == (variant == "registers")
    for teacher in (meta, via_timm, via_hf):
        assert_levels(teacher(x), maps, pooled, atol=1e-4)


def test_metas_fsdp_block_chunks_load_like_the_released_layout(checkpoints, tmp_path):
    model, root = checkpoints["plain"]
    state = torch.load(meta_file(root), weights_only=True)
    chunk = lambda k: f"blocks.{int(k.split('.')[1]) // 2}.{k[7:]}" if k.startswith("blocks.") else k  # noqa: E731
    chunked = {chunk(k): v for k, v in state.items()}  # block_chunks=2: blocks.<chunk>.<global index>.
    assert "blocks.1.3.attn.qkv.weight" in chunked
    torch.save(chunked, tmp_path / "chunked.pth")
    x = torch.randn(1, 3, 56, 56)
    teacher = create_teacher("dinov2", str(tmp_path / "chunked.pth"), model_kwargs=TIMM_TINY)
    assert_levels(teacher(x), *hf_levels(model, x), atol=1e-4)


def timm_with_pos_embed(state_file: str, pos_embed: torch.Tensor, size: int) -> torch.nn.Module:
    """timm's model at `size` holding Meta's file, with the given position embeddings."""
    net = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, **TIMM_TINY)
    net.load_state_dict(checkpoint_filter_fn(torch.load(state_file, weights_only=True), net))
    small = timm.create_model(
        "vit_base_patch14_dinov2", pretrained=False, num_classes=0, **{**TIMM_TINY, "img_size": size}
    )
    small.load_state_dict({**net.state_dict(), "pos_embed": pos_embed})
    return small.eval()


def test_other_input_sizes_keep_each_librarys_position_embedding_rule(checkpoints):
    model, root = checkpoints["plain"]
    x = torch.randn(1, 3, 28, 28)  # a 2 x 2 grid from the 4 x 4 one

    def teacher(weights, **options):
        return create_teacher("dinov2", weights, spec=TeacherSpec(image_size=28), **options)(x)

    via_hf = teacher(str(root / "hf"))
    meta = teacher(meta_file(root), model_kwargs=TIMM_TINY)
    via_timm = teacher(meta_file(root), source="timm", model_kwargs=TIMM_TINY)
    assert_levels(via_hf, *hf_levels(model, x), atol=1e-5)  # transformers: its own forward at 28 px
    # Meta's rule, as its interpolate_pos_encoding states it: bicubic, no antialias, scale (2 + 0.1) / 4
    pos = torch.load(meta_file(root), weights_only=True)["pos_embed"]
    grid = pos[:, 1:].reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(grid, scale_factor=(2.1 / GRID, 2.1 / GRID), mode="bicubic", antialias=False)
    meta_pos = torch.cat([pos[:, :1], patch.flatten(2).transpose(1, 2)], 1)
    assert_levels(meta, *timm_levels(timm_with_pos_embed(meta_file(root), meta_pos, 28), x), atol=1e-5)
    # timm's rule: resample_abs_pos_embed, bicubic, antialiased
    timm_pos = resample_abs_pos_embed(pos, [2, 2], antialias=True)
    assert_levels(via_timm, *timm_levels(timm_with_pos_embed(meta_file(root), timm_pos, 28), x), atol=1e-5)
    # the three rules really differ here (they agree at the native size, tested above)
    gaps = [(a.levels[-1] - b.levels[-1]).abs().max().item() for a, b in [(meta, via_hf), (via_timm, via_hf)]]
    assert min(gaps) > 1e-3, gaps


def test_register_models_resample_alike_in_every_library(checkpoints):
    """Meta's register models (antialiased, to size) and transformers' agree at any size; so does timm."""
    model, root = checkpoints["registers"]
    x = torch.randn(1, 3, 28, 28)
    maps, pooled = hf_levels(model, x)
    for source in ("meta", "timm", "transformers"):
        weights = str(root / "hf") if source == "transformers" else meta_file(root)
        kwargs = {} if source == "transformers" else {"model_kwargs": TIMM_TINY}
        teacher = create_teacher("dinov2", weights, spec=TeacherSpec(image_size=28), source=source, **kwargs)
        assert_levels(teacher(x), maps, pooled, atol=1e-4)


def test_meta_hub_tag_reads_torch_hubs_cache_and_says_what_to_do_offline(checkpoints, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
    cached = tmp_path / "hub" / "checkpoints" / "dinov2_vitb14_pretrain.pth"
    with pytest.raises(WeightsError, match=f"not in the torch.hub cache \\({cached}\\).*download {url}"):
        create_teacher("dinov2", "hub", source="meta", model_kwargs=TIMM_TINY)
    model, root = checkpoints["plain"]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(open(meta_file(root), "rb").read())
    teacher = create_teacher("dinov2", "lvd142m", source="meta", model_kwargs=TIMM_TINY)
    assert teacher.meta.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()
    x = torch.randn(1, 3, 56, 56)
    assert_levels(teacher(x), *hf_levels(model, x), atol=1e-4)


def test_two_processes_downloading_metas_checkpoint_at_once_both_get_it(checkpoints, tmp_path, monkeypatch):
    """The processes of a launch download together: through one fixed ".partial" name, the second to rename it
    into place found it gone (FileNotFoundError). A file:// URL stands in for Meta's server; the other process
    finishes its download while this one's is on its way."""
    from huggingface_hub import constants

    import sak.teachers.dinov2 as dinov2

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # (the tests run offline; the URL is a local file)
    model, root = checkpoints["plain"]
    server = tmp_path / "server" / "dinov2_vitb14"
    server.mkdir(parents=True)
    server.joinpath("dinov2_vitb14_pretrain.pth").write_bytes(open(meta_file(root), "rb").read())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(dinov2, "META_URL", (tmp_path / "server").as_uri())
    download, calls, others = torch.hub.download_url_to_file, [], []

    def with_another_process(url, dst, *args, **kwargs):
        download(url, dst, *args, **kwargs)
        calls.append(dst)
        if len(calls) == 1:  # (the other process's own download starts no third)
            others.append(dinov2.meta_hub_file("dinov2_vitb14", "other process"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", with_another_process)
    path = dinov2.meta_hub_file("dinov2_vitb14", "dinov2 teacher")
    assert path == others[0] == tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vitb14_pretrain.pth"
    assert path.read_bytes() == server.joinpath("dinov2_vitb14_pretrain.pth").read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no partial file left behind


def test_hub_ids_offline_say_where_they_looked_and_how_to_pass_a_local_copy(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        WeightsError, match="(?s)timm/vit_small_patch14_dinov2.lvd142m.*Hugging Face cache.*pass a local"
    ):
        create_teacher("dinov2", "lvd142m", size="small", model_kwargs=TIMM_TINY)
    with pytest.raises(
        WeightsError, match="(?s)'facebook/dinov2-large'.*Hugging Face cache.*local-dir DIR.*weights: DIR"
    ):
        create_teacher("dinov2", "facebook/dinov2-large")  # an org/name id -> transformers
    with pytest.raises(WeightsError, match="'facebook/dinov2-with-registers-small'"):
        create_teacher("dinov2", "hub", size="small", source="transformers", registers=True)


def test_wrong_files_sources_and_options_are_clear_errors(checkpoints, tmp_path):
    model, root = checkpoints["plain"]
    with pytest.raises(WeightsError, match="nope.pth' does not exist"):
        create_teacher("dinov2", str(tmp_path / "nope.pth"))
    # a hub id is org/name: a relative path of two folders, missing, is said missing (it was looked up on the hub)
    with pytest.raises(WeightsError, match=r"'ckpts/dino/model.npz' does not exist \(from "):
        create_teacher("dinov2", "ckpts/dino/model.npz")
    with pytest.raises(WeightsError, match="has meta's key names; use `source: meta`"):
        create_teacher("dinov2", meta_file(root), source="transformers")
    timm_file = str(tmp_path / "t.safetensors")
    save_file(timm.create_model("vit_base_patch14_dinov2", num_classes=0, **TIMM_TINY).state_dict(), timm_file)
    with pytest.raises(WeightsError, match="does not have Meta's layout.*use `source: timm`"):
        create_teacher("dinov2", timm_file, source="meta", model_kwargs=TIMM_TINY)
    with pytest.raises(WeightsError, match="registers=True, but .* has no register tokens"):
        create_teacher("dinov2", meta_file(root), registers=True, model_kwargs=TIMM_TINY)
    with pytest.raises(WeightsError, match="does not fit the model .*unexpected, e.g. \\['blocks.2"):
        create_teacher("dinov2", meta_file(root), model_kwargs={**TIMM_TINY, "depth": 2})
    with pytest.raises(
        ValueError, match="model_kwargs \\['depth'\\] are not Dinov2Config fields; valid: .*hidden_size"
    ):
        create_teacher("dinov2", source="transformers", model_kwargs={"depth": 2})
    with pytest.raises(ValueError, match="brings its own"):
        create_teacher("dinov2", str(root / "hf"), model_kwargs=HF_TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="has no config.json"):
        create_teacher("dinov2", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="sha256 of .* but the recipe expects 0000"):
        create_teacher("dinov2", spec=TeacherSpec(weights=meta_file(root), sha256="0" * 64), model_kwargs=TIMM_TINY)
    with pytest.raises(WeightsError, match="source timm .* 'facebook/dinov2-base' is for transformers"):
        create_teacher("dinov2", "facebook/dinov2-base", source="timm")
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        create_teacher("dinov2", spec=TeacherSpec(image_size=30), model_kwargs=TIMM_TINY)
    with pytest.raises(ValueError, match="levels \\[1, 7\\] must be block indices in 0..3"):
        create_teacher("dinov2", spec=TeacherSpec(levels=[1, 7]), model_kwargs=TIMM_TINY)
    # random weights download nothing: these were "could not load ... from the Hugging Face hub", or a traceback
    for bad, error in (({"mlp_ratio": -1.0}, "RuntimeError"), ({"embed_dim": 30, "num_heads": 4}, "AssertionError")):
        for weights in (None, "lvd142m"):  # (timm builds before it downloads: the tag's failure was no download's)
            with pytest.raises(ValueError, match=f"model_kwargs .* do not build the model: {error}"):
                create_teacher("dinov2", weights, model_kwargs={**TIMM_TINY, **bad})


def test_frozen_and_any_loader_image_becomes_the_input_grid():
    teacher = create_teacher("dinov2", source="transformers", model_kwargs=HF_TINY)
    teacher.train()
    assert not any(m.training for m in teacher.modules()) and not any(p.requires_grad for p in teacher.parameters())
    out = teacher.encode(torch.randint(0, 255, (2, 3, 70, 90), dtype=torch.uint8))
    assert [t.shape for t in out.levels] == [(2, 32, 4, 4)] * 4 and out.summary.shape == (2, 32)
    assert not out.levels[0].requires_grad


def test_preprocessing_matches_timms_and_transformers_transforms_on_a_real_image():
    """astronaut is 512 x 512: the libraries' shortest-side resize + centre crop and our whole-image resize see
    the same pixels. Differences are PIL's 8-bit resampling against float32 tensor resampling."""
    from PIL import Image
    from skimage import data
    from timm.data import create_transform, resolve_data_config
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    image = data.astronaut()
    batch = torch.from_numpy(image).permute(2, 0, 1)[None]
    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    teacher = create_teacher("dinov2", model_kwargs=tiny)  # native 518, timm's pretrained_cfg: crop_pct 1.0
    config = resolve_data_config({}, model=teacher.backbone.model)
    assert config["input_size"] == (3, 518, 518) and config["crop_pct"] == 1.0 and config["interpolation"] == "bicubic"
    expected = create_transform(**config)(Image.fromarray(image))[None]
    ours = teacher.preprocess(batch)
    gap = (ours - expected).abs()
    assert ours.shape == expected.shape and gap.max() < 0.12 and gap.mean() < 0.006, (gap.max(), gap.mean())
    resized = F.interpolate(batch / 255, size=(518, 518), mode="bicubic", align_corners=False, antialias=True)
    unclamped = (normalize(resized, teacher.meta.mean, teacher.meta.std) - expected).abs().max()
    assert unclamped > 2 * gap.max()  # PIL saturates at 0 / 255; without the clamp bicubic overshoot shows
    # facebook/dinov2-*'s preprocessor_config.json: BitImageProcessor, bicubic, shortest edge 256 then a 224 centre
    # crop (crop_pct 0.875, an ImageNet-evaluation habit); with the shortest edge at the crop size it sees what we see
    hf = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3)
    hf.update(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    expected = BitImageProcessorPil(**hf)(images=image, return_tensors="pt")["pixel_values"]
    ours = create_teacher("dinov2", spec=TeacherSpec(image_size=224), model_kwargs=tiny).preprocess(batch)
    gap = (ours - expected).abs()
    assert ours.shape == expected.shape and gap.max() < 0.1 and gap.mean() < 0.006, (gap.max(), gap.mean())
    assert np.isclose(float(expected.mean()), float(ours.mean()), atol=1e-3)


def test_a_pinned_sha256_on_a_transformers_directory_is_that_of_the_file_it_reads(checkpoints, tmp_path):
    """from_pretrained reads sharded safetensors before a pytorch_model.bin: a directory holding both had its
    sha256 checked against the .bin, whose weights were never loaded. Now only a directory with one weights file
    for transformers to read takes a sha256."""
    model, _ = checkpoints["plain"]
    folder = tmp_path / "hf"
    model.save_pretrained(folder, max_shard_size="20KB")  # config.json, shards and their index
    assert not (folder / "model.safetensors").exists() and (folder / "model.safetensors.index.json").is_file()
    torch.save({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    pinned = hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match=r"sha256 needs a directory with one weights file .* holds \['model-0000"):
        create_teacher("dinov2", str(folder), spec=TeacherSpec(weights=str(folder), sha256=pinned))
    # its metadata's digest is one over config.json, the index and every weights file (it was None, so a
    # feature cache of these weights did not see them change), not that of a file it did not read
    digest = create_teacher("dinov2", str(folder)).meta.sha256
    assert digest is not None and digest != pinned
    shard = sorted(folder.glob("model-0000*.safetensors"))[-1]
    state = load_file(str(shard))
    save_file({k: v + 1 for k, v in state.items()}, str(shard))
    assert create_teacher("dinov2", str(folder)).meta.sha256 not in (None, digest)


def test_a_misspelt_tag_is_named_as_such_not_sent_to_transformers():
    """'lvd142' was answered with "is for transformers (`source: transformers`)", which then refused it."""
    with pytest.raises(WeightsError, match=r"'lvd142' is not a weights tag of DINOv2 \(tags: hub, default, lvd142m\)"):
        create_teacher("dinov2", "lvd142")


def test_a_timm_hub_snapshot_folder_reads_its_weights_file(tmp_path):
    """`hf download timm/vit_..._dinov2.lvd142m --local-dir DIR` holds timm's config.json (no model_type) and its
    model.safetensors: the folder was taken for transformers', whose error named neither teacher nor file."""
    ref = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, **TIMM_TINY).eval()
    randomise(ref, 3)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    save_file(ref.state_dict(), str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"architecture": "vit_base_patch14_dinov2", "num_classes": 0}))
    x = torch.randn(1, 3, 56, 56)
    for source in (None, "timm"):
        teacher = create_teacher(
            "dinov2", str(snapshot), model_kwargs=TIMM_TINY, **({"source": source} if source else {})
        )
        assert teacher.meta.source == "timm"
        assert teacher.meta.sha256 == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
        assert_levels(teacher(x), *timm_levels(ref, x), atol=1e-5)
    save_file(ref.state_dict(), str(snapshot / "other.safetensors"))
    with pytest.raises(WeightsError, match=r"config.json' is not a transformers DINOv2 config \(model_type None\).*"
                                           r"pass its weights file directly"):  # fmt: skip
        create_teacher("dinov2", str(snapshot), model_kwargs=TIMM_TINY)


def test_a_transformers_file_beside_another_librarys_config_is_a_clear_error(tmp_path):
    save_file(hf_reference().state_dict(), str(tmp_path / "dino.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch14_dinov2"}))
    with pytest.raises(WeightsError, match=r"config.json \(beside the weights\) describes no transformers model"):
        create_teacher("dinov2", str(tmp_path / "dino.safetensors"), model_kwargs=HF_TINY)


def test_source_timm_reads_a_meta_file_without_its_mask_token(checkpoints, tmp_path):
    """Meta's layout is also told by register tokens; timm's converter needs the (unused) mask token to see it."""
    model, root = checkpoints["registers"]
    state = torch.load(meta_file(root), weights_only=True)
    del state["mask_token"]
    torch.save(state, tmp_path / "no_mask.pth")
    x = torch.randn(1, 3, 56, 56)
    teacher = create_teacher("dinov2", str(tmp_path / "no_mask.pth"), source="timm", model_kwargs=TIMM_TINY)
    assert_levels(teacher(x), *hf_levels(model, x), atol=1e-4)


def test_hub_weights_that_do_not_fit_the_model_are_named_as_such_not_as_a_failed_download(monkeypatch):
    from sak.teachers import dinov2

    def misfit(*args, **kwargs):
        raise RuntimeError('Error(s) in loading state_dict for VisionTransformer:\n\tUnexpected key(s): "blocks.10.x"')

    monkeypatch.setattr(dinov2.timm, "create_model", misfit)
    with pytest.raises(WeightsError) as exc:
        create_teacher("dinov2", "lvd142m", size="small", model_kwargs={"depth": 6})
    message = str(exc.value)
    assert "the hub weights 'vit_small_patch14_dinov2.lvd142m' do not fit the model built (Unexpected key(s)" in message
    assert "check `size` / `model_kwargs`" in message and "Offline, pass a local file" not in message
