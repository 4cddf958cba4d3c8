"""benchmarks/sam_attention.py: SAM's relative-position attention written out, folded and through FlexAttention."""

import json

from benchmarks.sam_attention import block_shapes, main


def test_block_shapes_pad_the_grid_to_whole_windows():
    # 1024 px: a 64 x 64 grid; the windowed blocks pad it to 70 x 70, 5 x 5 windows of 14 x 14 per image
    assert block_shapes(1024, 16) == {"global": (16, 64, 64), "windowed": (16 * 25, 14, 14)}
    assert block_shapes(224, 2) == {"global": (2, 14, 14), "windowed": (2, 14, 14)}


def test_writes_both_tables_and_every_kernel_agrees_with_the_written_out_attention(tmp_path):
    assert main(["--image-size", "64", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                 "--results", str(tmp_path)]) == 0  # fmt: skip
    r = json.loads((tmp_path / "sam_attention_cpu.json").read_text())
    rows = r["attention"]
    assert {(x["block"], x["dtype"], x["kernel"]) for x in rows} == {
        (block, dtype, kernel)
        for block in ("global", "windowed")
        for dtype in ("float32", "bfloat16")
        for kernel in ("written out", "folded", "folded, v 64 wide", "flex")
    }
    for x in rows:
        assert x["seconds"] > 0 and x["tflops"] > 0
        assert x["error"] < (1e-5 if x["dtype"] == "float32" else 5e-2), x
    encoder = {x["attention"]: x["relative_difference_to_library"] for x in r["encoder"]}
    assert encoder["library"] == 0 and 0 < encoder["folded"] < 1e-5 and 0 < encoder["flex"] < 1e-5
    md = (tmp_path / "sam_attention_cpu.md").read_text()
    assert md.count("\n| ") == 2 + len(rows) + 2 + 3
