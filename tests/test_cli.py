"""The `sak` command's inspection sub-commands."""

import json

import pytest
import torch

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
    assert "random weights" not in capsys.readouterr().err  # (the package's own weights)
    tiny = ["model=vit_small_patch16_224", "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2}"]
    assert main(["teachers", "show", "timm", *tiny]) == 0
    assert "sak teachers: note: timm has no --weights: random weights" in capsys.readouterr().err
    # a recipe's levels and sha256 (neither could be given: the shapes shown were the default levels')
    assert main(["teachers", "show", "hed", "--image-size", "64", "--levels", "1,3"]) == 0
    assert json.loads(capsys.readouterr().out)["level_shapes"] == [[128, 32, 32], [512, 8, 8]]
    assert main(["teachers", "show", "hed", "--levels", "a"]) == 2
    assert "--levels 'a': comma-separated block indices" in capsys.readouterr().err
    assert main(["teachers", "show", "hed", "--sha256", "0" * 64]) == 2
    assert "0000000000000000" in capsys.readouterr().err  # the digest given, refused against the file's


def test_a_teachers_options_may_follow_the_flags(capsys):
    """They were "unrecognized arguments" after --image-size (as overrides were, before they were handled)."""
    kwargs = "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2, img_size: 64}"
    assert main(["teachers", "show", "timm", "--image-size", "64", "model=vit_small_patch16_224", kwargs]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["embed_dim"] == 32 and meta["level_shapes"] == [[32, 4, 4]] * 2


def test_overrides_may_follow_the_options(capsys):
    assert main(["model", "show", str(TINY), "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["model", "show", str(TINY), "--json", "student.down_ratio=2"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["tsap.vit_a"] > default["tsap.vit_a"]  # a wider adapter bottleneck: the override took effect


@pytest.mark.parametrize("argv", [["train"], ["export", "--out", "x"], ["cache", "info"], ["recipe", "show"]])
def test_a_missing_recipe_is_the_only_argument_said_to_be_required(argv, capsys):
    """Overrides are optional: argparse listed them as required beside the recipe ("recipe, overrides")."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    required = err.split("the following arguments are required: ")[1]
    assert exc.value.code == 2 and "overrides" not in required


def test_stray_arguments_are_still_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["model", "show", str(TINY), "--json", "not-an-override"])
    assert exc.value.code == 2 and "unrecognized arguments: not-an-override" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["teachers", "show", "nosuch"], "sak teachers: UnknownNameError: unknown teacher 'nosuch'; known names:"),
        (["teachers", "show", "timm", "foo"], "sak teachers: ValueError: teacher option 'foo': expected KEY=VALUE"),
        (["teachers", "show", "timm", "model={x"],  # (a YAML error was a traceback)
         "sak teachers: ValueError: teacher option 'model={x': the value is not valid YAML (expected ',' or '}'"),
        (["teachers", "show", "timm", "model=vit_small_patch16_224", "--image-size", "-16"],
         "sak teachers: ValueError: --image-size must be a positive side in pixels, got -16"),
        (["teachers", "show", "timm", "model=vit_small_patch16_224", "model_kwargs={depth:2}"],
         "sak teachers: ValueError: teacher option model_kwargs: 'depth:2' is a key without a value; YAML needs a "
         "space after the colon: `depth: 2`"),
        (["train", str(TINY), "optim.lr={x"],  # (PyYAML's several lines of marks and carets)
         f"sak: {TINY}: override 'optim.lr={{x': the value is not valid YAML (expected ',' or '}}', but got"),
        (["train", str(TINY), "student.model_kwargs={embed_dim:32, depth: 2}"],  # (read as a key "embed_dim:32")
         f"sak: {TINY}: student.model_kwargs: 'embed_dim:32' is a key without a value; YAML needs a space after"),
        (["teachers", "show", "dinov2", "foo=1"],
         "sak: unknown key 'dinov2.options.foo'; valid keys here: size, source,"),
        (["export", str(TINY), "--from", "/nonexistent", "--out", "x"], "sak export: FileNotFoundError: sak export --from"),
        (["predict", "/nonexistent", "x.png", "--out", "x"], "sak predict: FileNotFoundError:"),
        (["train", str(TINY), "data.name=image_folder", "data.options={}", "data.root=/nonexistent"],
         "sak train: FileNotFoundError: data.root '/nonexistent' is not a directory"),
        (["train", str(TINY), "data.image_size=60"],
         "sak train: ValueError: data.image_size 60 is not a multiple of the student's patch size 16 "
         "(vit_small_patch16_224): its patch embedding would drop the last 12 px of every crop; use 48 or 64"),
        (["train", str(TINY), "data.image_size=8"], "sak train: ValueError: data.image_size 8 is not a multiple"),
        # what `recipe check` cannot tell without building the teachers (docs/getting-started.md)
        (["model", "show", str(TINY), "teachers.0.image_size=57"],
         "sak model: ValueError: teacher 'timm' (vit_small_patch14_dinov2): image_size 57 is not a multiple of its "
         "patch size / stride 14"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_naming_the_problem_and_exit_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, f"run.output_dir={tmp_path}"] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_sak_traceback_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv("SAK_TRACEBACK", "1")
    with pytest.raises(KeyError, match="unknown teacher 'nosuch'"):
        main(["teachers", "show", "nosuch"])


def test_results_with_a_metric_that_scored_nothing_are_strict_json(tmp_path, capsys):
    """A metric that scores nothing is NaN by design; `sak eval --out` and final_metrics.json wrote a bare NaN,
    which strict JSON readers refuse. It is null now, as in metrics.jsonl."""
    from sak.cli import _write_result
    from sak.engine.logging import json_safe

    result = {"pascal_context": {"parts": {"mIoU": float("nan")}}, "delta_m": float("inf"), "n": [1.0, float("nan")]}
    assert json_safe(result) == {"pascal_context": {"parts": {"mIoU": None}}, "delta_m": None, "n": [1.0, None]}
    _write_result(result, None)
    parsed = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert parsed["delta_m"] is None and parsed["pascal_context"]["parts"]["mIoU"] is None


def test_one_process_commands_run_on_the_main_process_of_a_launch(tmp_path, monkeypatch, capsys):
    """Under `accelerate launch` with N processes, each process ran all of `export`, `predict`, `eval-preds`,
    `model show`..., and two exports into one folder could pair one's weights with the other's student.yaml.
    The main process runs them; the others do nothing."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["export", str(TINY), "--from", "/nonexistent", "--out", str(tmp_path / "x")]) == 0
    assert main(["model", "show", str(TINY), "--json"]) == 0
    assert main(["cache", "info", "/nonexistent"]) == 0
    assert capsys.readouterr() == ("", "") and not (tmp_path / "x").exists()

    monkeypatch.setenv("RANK", "0")
    assert main(["model", "show", str(TINY), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["total"] > 0
    assert err == "sak model: runs on one process; the other 1 of this launch do nothing\n"


def test_errors_under_a_launch_say_whose_they_are_and_a_recipes_is_said_once(monkeypatch, capsys, tmp_path):
    from sak.cli import say_error

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    say_error("sak: an image of this process's shard")
    say_error("sak: the recipe's", everywhere=False)
    assert capsys.readouterr().err == "[process 2/3] sak: an image of this process's shard\n"
    # the recipe error of `sak eval` (every process reads the same recipe): not printed by process 2
    assert main(["eval", str(TINY), "--checkpoint", str(tmp_path), "optim.nosuch=1"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["eval", str(TINY), "--checkpoint", str(tmp_path), "optim.nosuch=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sak: ") and "optim.nosuch" in err and len(err.splitlines()) == 1, err


class BadLabelFile(torch.utils.data.Dataset):
    """A dataset whose second label file is damaged, as sak's readers say it: a DataError raised from PIL's."""

    def __init__(self, root):
        self.root = root

    def __len__(self):
        return 2

    def __getitem__(self, index):
        from sak.data.pascal_context import read_png

        (self.root / "l1.png").write_bytes(b"not a png")
        return read_png(self.root / f"l{index}.png", 1) if index else torch.zeros(1)


def test_a_loader_workers_error_is_one_line_naming_the_file_and_the_worker(tmp_path, capsys):
    """With data.num_workers > 0 (every shipped stage-2 recipe) a damaged file was torch's ~45-line re-raise
    of the worker's traceback, the file named on its last line."""
    from sak.cli import print_user_error

    loader = torch.utils.data.DataLoader(BadLabelFile(tmp_path), batch_size=1, num_workers=1)
    with pytest.raises(ValueError) as info:
        list(loader)
    assert "Original Traceback" in str(info.value)
    assert print_user_error(info.value, "train")
    assert capsys.readouterr().err == (
        f"sak train: DataError: {tmp_path / 'l1.png'}: cannot decode the PNG (cannot identify image file "
        f"'{tmp_path / 'l1.png'}') (in DataLoader worker process 0)\n"
    )


def test_a_closed_pipe_ends_the_command_quietly():
    """`sak model show R | head -1`: it printed "sak model: BrokenPipeError: [Errno 32] Broken pipe" (exit 2)."""
    import subprocess
    import sys

    from .conftest import REPO

    proc = subprocess.Popen([sys.executable, "-m", "sak.cli", "model", "show", str(TINY)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_ctrl_c_is_one_line_saying_how_to_go_on(monkeypatch, capsys):
    """Ctrl-C during `sak cache build` printed a KeyboardInterrupt traceback; a rebuild goes on where it stopped."""
    import sak.engine.cache as cache_module
    import sak.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "build_cache", interrupted)
    assert main(["cache", "build", str(TINY), "--out", "/nonexistent/c"]) == 130
    assert capsys.readouterr().err == "sak cache: interrupted; run it again to go on where it stopped\n"
    import sak.engine as engine_module

    monkeypatch.setattr(engine_module, "train", interrupted)  # (`sak train` and `accelerate launch -m sak.train`)
    assert main(["train", str(TINY)]) == 130 and train_module.main([str(TINY)]) == 130
    err = capsys.readouterr().err.splitlines()
    assert err == ["sak train: interrupted; run it again to go on from its last checkpoint (with "
                   "checkpoint.resume: auto)"] * 2  # fmt: skip
