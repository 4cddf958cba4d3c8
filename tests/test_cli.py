"""The `sak` command's inspection sub-commands."""

import json

import pytest

from sak.cli import main

from .conftest import TINY


def test_model_show_json_reports_every_component(capsys):
    assert main(["model", "show", str(TINY), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"tas", "tsap.vit_a", "tsap.vit_b", "aligners", "total", "inference"} <= set(report)
    assert report["inference"] == report["total"] - report["aligners"]


def test_teachers_list_includes_the_offline_teachers(capsys):
    assert main(["teachers", "list"]) == 0
    names = capsys.readouterr().out.split()
    assert {"timm", "dinov2_imgfocus", "efficientnet_lite0", "hed"} <= set(names)


def test_teachers_show_prints_metadata_and_level_shapes(capsys):
    assert main(["teachers", "show", "hed", "--image-size", "64"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["level_shapes"] == [[128, 32, 32], [256, 16, 16], [512, 8, 8], [512, 4, 4]]
    assert meta["sha256"] and meta["num_params"] == 14_716_171


def test_overrides_may_follow_the_options(capsys):
    assert main(["model", "show", str(TINY), "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["model", "show", str(TINY), "--json", "student.down_ratio=2"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["tsap.vit_a"] > default["tsap.vit_a"]  # a wider adapter bottleneck: the override took effect


def test_stray_arguments_are_still_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["model", "show", str(TINY), "--json", "not-an-override"])
    assert exc.value.code == 2 and "unrecognized arguments: not-an-override" in capsys.readouterr().err
