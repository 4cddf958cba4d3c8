"""The documented plug-in examples, run exactly as written, from a package outside `sak/`."""

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from sak.cli import main
from sak.config import RecipeError, load_recipe
from sak.engine.build import build_student, build_tasks, build_teachers

from .conftest import REPO, TINY
from .engine.test_distributed import accelerate_launch
from .test_config import importing


def code_block(doc: str) -> str:
    text = (REPO / "docs" / doc).read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "my_sak_plugins"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "teacher.py").write_text(code_block("adding-a-teacher.md"))
    (package / "adapter.py").write_text(code_block("adding-an-adapter.md"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    return package


def plugin_recipe(tmp_path, **edits):
    data = yaml.safe_load(TINY.read_text())
    data["imports"] = ["my_sak_plugins.teacher", "my_sak_plugins.adapter"]
    data["teachers"].append({"name": "my_conv", "key": "conv", "options": {"width": 8}})
    data["run"]["output_dir"] = str(tmp_path / "runs")
    data.update(edits)
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_documented_teacher_plugin_trains_in_two_cpu_processes(plugin_package, tmp_path):
    recipe = plugin_recipe(tmp_path)
    run = accelerate_launch(str(recipe), "data.batch_size=2", "schedule.max_steps=3")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert any("distill/conv" in r for r in rows)
    assert json.loads((tmp_path / "runs" / "tiny" / "run_info.json").read_text())["world_size"] == 2


def test_documented_teacher_loads_its_file_strictly_and_names_it(plugin_package, tmp_path):
    """The example loaded with torch's load_state_dict (a RuntimeError traceback for another width's file)
    and left `meta.weights` at "random" for a teacher read from a file."""
    import importlib

    from sak.teachers import TeacherSpec, create_teacher
    from sak.teachers.weights import WeightsError

    importlib.import_module("my_sak_plugins.teacher")
    file = tmp_path / "conv8.safetensors"
    save_file(create_teacher("my_conv", width=8).state_dict(), str(file))
    loaded = create_teacher("my_conv", str(file), width=8)
    assert loaded.meta.weights == str(file) and loaded.meta.sha256 is not None
    assert create_teacher("my_conv", width=8).meta.weights == "random"
    with pytest.raises(WeightsError, match=r"my_conv: '.*conv8.safetensors' does not fit the model .* shape mismatch"
                       r".*Check the option `width` against the checkpoint\.$"):  # fmt: skip
        create_teacher("my_conv", str(file), width=16)
    # a hub tag, which the example takes none of: "pass a local file", not "... or a hub tag"
    with pytest.raises(WeightsError, match=r"weights file 'hub' does not exist \(from .*\)\. Pass a local \.safetensors or \.pth "
                       r"file \(no hub\)\.$"):  # fmt: skip
        create_teacher("my_conv", "hub", width=8)
    # its meta describes the last level it returns: the first two stages take any multiple of their stride 4
    shallow = create_teacher("my_conv", spec=TeacherSpec(levels=(0, 1), image_size=36), width=8)
    assert (shallow.meta.embed_dim, shallow.meta.patch_size) == (16, 4)
    assert [o.shape[1:] for o in shallow(torch.zeros(1, 3, 36, 36)).levels] == [(8, 18, 18), (16, 9, 9)]


def test_documented_adapter_plugin_trains(plugin_package, tmp_path, tiny_recipe):
    from sak.engine import train

    recipe = plugin_recipe(tmp_path)
    loaded = tiny_recipe("teachers.0.adapter=conv_adapter", "schedule.max_steps=3", path=recipe)
    train(loaded)
    student = build_student(loaded, build_teachers(loaded, torch.device("cpu")), build_tasks(loaded))
    assert type(student.paths["vit_a"].adapters[0]).__name__ == "ConvAdapter"
    assert type(student.paths["vit_b"].adapters[0]).__name__ == "BottleneckAdapter"


def test_documented_adapter_mixes_true_neighbours_on_a_non_square_grid(plugin_package):
    """On 2 x 5 patches and a class token (11 tokens, which a square guess would read as 2 + 3 x 3), the
    documented adapter equals a depthwise 3 x 3 convolution over the 2 x 5 map, the class token untouched."""
    import importlib

    from sak.registry import ADAPTERS
    from sak.student import TokenGrid

    importlib.import_module("my_sak_plugins.adapter")
    torch.manual_seed(0)
    adapter = ADAPTERS.get("conv_adapter")(8, 2)
    x = torch.randn(3, 11, 8)
    h = adapter.down(x)
    patches = h[:, 1:].reshape(3, 2, 5, 4).permute(0, 3, 1, 2)  # (B, hidden, 2, 5), row-major tokens
    mixed = torch.nn.functional.conv2d(patches, adapter.conv.weight, adapter.conv.bias, padding=1, groups=4)
    h = torch.cat([h[:, :1], mixed.flatten(2).transpose(1, 2)], dim=1)
    expected = x + adapter.scale * adapter.up(torch.nn.functional.gelu(h))
    torch.testing.assert_close(adapter(x, grid=TokenGrid(1, 2, 5)), expected)
    with pytest.raises(ValueError, match="do not lie on"):
        adapter(x, grid=TokenGrid(1, 3, 3))


def test_teachers_list_and_show_include_the_plugin(plugin_package, capsys):
    import importlib

    importlib.import_module("my_sak_plugins.teacher")
    assert main(["teachers", "list"]) == 0
    assert "my_conv" in capsys.readouterr().out.split()
    assert main(["teachers", "show", "my_conv", "width=4", "--image-size", "64"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["source"] == "plug-in" and shown["level_shapes"] == [[4, 32, 32], [8, 16, 16], [16, 8, 8], [32, 4, 4]]
    assert shown["num_params"] == (3 * 4 * 9 + 4) + (4 * 8 * 9 + 8) + (8 * 16 * 9 + 16) + (16 * 32 * 9 + 32)


def test_the_cli_imports_plugins_for_teachers_show_and_for_an_exported_students_adapter(plugin_package, tmp_path):
    """In fresh processes, where nothing imported the plug-ins: `sak teachers show --import M`, and `sak
    predict` on the export of a student whose adapter is a plug-in (student.yaml keeps the recipe's imports)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from sak.data.base import read_manifest
    from sak.engine import train

    def sak(*argv):
        return subprocess.run([sys.executable, "-m", "sak.cli", *argv], capture_output=True, text=True)

    shown = sak("teachers", "show", "my_conv", "width=4", "--import", "my_sak_plugins.teacher")
    assert shown.returncode == 0 and json.loads(shown.stdout)["name"] == "my_conv", shown.stderr[-2000:]
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 80 * i, dtype=np.uint8)).save(pool / f"{i}.png")
    select = ["select", "--pool", str(pool), "--budget", "1", "--teacher", "my_conv", "--option", "width=4",
              "--no-progress", "--out", str(tmp_path / "subset.txt")]  # fmt: skip
    unknown = sak(*select)  # (the hint said to list the module under a recipe's imports:, which a folder has not)
    assert unknown.returncode == 2 and "unknown teacher 'my_conv'" in unknown.stderr
    assert "--import MODULE" in unknown.stderr
    selected = sak(*select, "--import", "my_sak_plugins.teacher")
    assert selected.returncode == 0, selected.stderr[-2000:]
    assert len(read_manifest(str(tmp_path / "subset.txt"))) == 1
    data = yaml.safe_load((REPO / "tests" / "tiny_multitask.yaml").read_text())
    data["imports"] = ["my_sak_plugins.adapter"]
    data["teachers"][0]["adapter"] = "conv_adapter"
    data["run"]["output_dir"] = str(tmp_path / "runs")
    recipe = tmp_path / "plugin_multitask.yaml"
    recipe.write_text(yaml.safe_dump(data))
    from sak.config import load_recipe

    train(load_recipe(recipe, ["schedule.max_steps=1"]))
    assert main(["export", str(recipe), "--out", str(tmp_path / "export")]) == 0
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    predicted = sak("predict", str(tmp_path / "export"), str(tmp_path / "photo.png"), "--out", str(tmp_path / "p"))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert (tmp_path / "p" / "semseg" / "photo.png").is_file()


def test_misspelt_plugin_teacher_hints_at_imports(tmp_path):
    from sak.config import RecipeError, load_recipe

    data = yaml.safe_load(TINY.read_text())
    data["teachers"][0]["name"] = "my_convnet"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="unknown teacher 'my_convnet'.*imports:"):
        load_recipe(path)


def test_convolutional_teachers_run_channels_last_with_the_same_output(plugin_package, tmp_path):
    from sak.config import load_recipe

    recipe = load_recipe(plugin_recipe(tmp_path))
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    torch.manual_seed(0)
    fast = build_teachers(recipe, torch.device("cpu"))["conv"]
    torch.manual_seed(0)
    plain = build_teachers(load_recipe(plugin_recipe(tmp_path), ["precision.channels_last=false"]), torch.device("cpu"))
    assert fast.channels_last and not plain["conv"].channels_last and not plain["vit_a"].channels_last
    for a, b in zip(fast.encode(images).levels, plain["conv"].encode(images).levels, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_sak_command_finds_a_plugin_in_the_current_directory_as_python_m_does(tmp_path, monkeypatch):
    """`python -m sak.train` (and `accelerate launch -m`) put the current directory on sys.path and the `sak`
    command did not: one recipe with a plug-in beside it was accepted by one and refused by the other."""
    import shutil
    import subprocess

    (tmp_path / "beside_plugin.py").write_text("print('beside_plugin imported')\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"imports: [beside_plugin]\n{TINY.read_text()}")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    sak = shutil.which("sak", path=str(Path(sys.executable).parent))
    out = subprocess.run([sak, "recipe", "check", str(recipe)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and "beside_plugin imported" in out.stdout, out.stderr[-2000:]
    out = subprocess.run([sak, "recipe", "check", "r.yaml", "imports=[no_such_plugin]"], cwd=tmp_path,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "or in the current directory" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (
            "x = 1\nraise RuntimeError('no GPU driver here')\n",
            r"RuntimeError: no GPU driver here \(raised at .*broken_plugin_\w+\.py:2\)",
        ),
        ("def f(:\n    pass\n", r"SyntaxError: .*broken_plugin_\w+\.py, line 1"),
        # a ValueError of its own: not taken for a name registered twice
        ("\n\nx = int('abc')\n", r"ValueError: invalid literal .* \(raised at .*broken_plugin_\w+\.py:3\)"),
        # a library it calls fails: the plug-in's line, not the library's
        (
            "import json\n\njson.loads('{')\n",
            r"JSONDecodeError: .* \(raised at .*broken_plugin_\w+\.py:3\)",
        ),
        # a module it imports is missing: a dependency to install, not a plug-in that cannot be found
        (
            "import no_such_dependency_of_a_plugin\n",
            r"ModuleNotFoundError: No module named 'no_such_dependency_of_a_plugin' \(raised at .*broken_plugin_\w+\.py:1\)",
        ),
    ],
    ids=["raises", "syntax", "value", "library", "dependency"],
)
def test_a_plugin_whose_own_code_fails_is_one_line_naming_where(code, said, tmp_path, monkeypatch, request):
    """Not 25 lines through importlib without the recipe's `imports[i]`: the module, the error and its line."""
    name = f"broken_plugin_{request.node.callspec.id}"
    path = importing(tmp_path, monkeypatch, name, code)
    with pytest.raises(RecipeError, match=rf"imports\[0\]: plug-in module '{name}' failed while importing: {said}"):
        load_recipe(path)


def test_options_of_a_plugin_that_are_no_dataclass_are_named(tmp_path, monkeypatch):
    """`class Options:` without @dataclass: dataclasses.fields' bare TypeError named neither teacher nor class."""
    code = ("from sak.registry import TEACHERS\nfrom sak.teachers.timm_teacher import TimmTeacher\n"
            "@TEACHERS.register('undecorated')\nclass Undecorated(TimmTeacher):\n"
            "    class Options:\n        scale: float = 1.0\n")  # fmt: skip
    path = importing(tmp_path, monkeypatch, "undecorated_plugin", code)
    with pytest.raises(RecipeError, match=r"teachers\[0\]: Undecorated.Options must be a @dataclass of its options"):
        load_recipe(path, ["teachers.0.name=undecorated"])


def test_an_options_field_of_a_type_recipes_cannot_hold_says_which_types_they_can(tmp_path, monkeypatch):
    """`eval_size: tuple[int, int]`, natural beside DenseAugment's tuples, was "unsupported field type" alone."""
    code = ("from dataclasses import dataclass\nfrom sak.registry import TEACHERS\n"
            "from sak.teachers.timm_teacher import TimmTeacher\n@TEACHERS.register('tupled')\nclass Tupled(TimmTeacher):\n"
            "    @dataclass\n    class Options(TimmTeacher.Options):\n        size: tuple[int, int] = (64, 64)\n")  # fmt: skip
    path = importing(tmp_path, monkeypatch, "tupled_plugin", code)
    with pytest.raises(RecipeError, match=r"teachers\[0\]\.options\.size: unsupported field type tuple\[int, int\]; "
                                          r"an Options field is a bool, .*\(a tuple: list\[int\], say\)"):  # fmt: skip
        load_recipe(path, ["teachers.0.name=tupled", "teachers.0.options.size=[32, 32]"])
