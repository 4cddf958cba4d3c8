"""Recipes: every shipped YAML validates; bad recipes fail before any work with a precise message."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from sak.config import Recipe, RecipeError, apply_override, load_recipe

from .conftest import REPO, TESTS, TINY

TINY_MULTITASK = TESTS / "tiny_multitask.yaml"

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES, "recipes/ holds no YAML"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)


def write_variant(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(TINY.read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_misspelt_key_names_key_file_and_valid_keys(tmp_path):
    path = write_variant(tmp_path, lambda d: d["optim"].update(lrr=0.1))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert str(path) in msg and "optim.lrr" in msg and "did you mean 'lr'" in msg and "weight_decay" in msg


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write_variant(tmp_path, lambda d: d["data"].update(batch_size="four"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert str(path) in msg and "data.batch_size" in msg and "expected an integer" in msg and "'four'" in msg


def test_unknown_teacher_lists_known_teachers(tmp_path):
    path = write_variant(tmp_path, lambda d: d["teachers"][0].update(name="dinov9"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert str(path) in msg and "teachers[0].name" in msg and "'dinov9'" in msg and "timm" in msg and "imports:" in msg


def test_unknown_task_lists_known_tasks(tmp_path):
    path = write_variant(tmp_path, lambda d: d.update(tasks=[{"name": "semseg"}, {"name": "optical_flow"}]))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert str(path) in msg and "tasks[1].name" in msg and "optical_flow" in msg
    for known in ("semseg", "parts", "saliency", "normals", "edges", "depth"):
        assert known in msg


def test_unknown_teacher_option_is_rejected(tmp_path):
    path = write_variant(tmp_path, lambda d: d["teachers"][0]["options"].update(modle="x"))
    with pytest.raises(RecipeError, match=r"teachers\[0\]\.options\.modle.*did you mean 'model'"):
        load_recipe(path)


def test_bad_literal_value_lists_choices(tmp_path):
    path = write_variant(tmp_path, lambda d: d.update(precision={"mixed": "fp8"}))
    with pytest.raises(RecipeError, match=r"precision\.mixed: 'fp8' is not one of 'no', 'bf16', 'fp16'"):
        load_recipe(path)


def test_yaml_bare_no_is_the_choice_no_not_false(tmp_path):
    """YAML 1.1 reads `mixed: no` as false; where "no" is a choice, that is what the user meant."""
    path = tmp_path / "r.yaml"
    path.write_text((TINY.read_text()) + "\nprecision: {mixed: no, teachers: no}\n")
    with pytest.raises(RecipeError, match=r"precision\.teachers: False is not one of"):
        load_recipe(path)  # teachers has no "no" choice: the error shows the value as read
    path.write_text((TINY.read_text()) + "\nprecision: {mixed: no}\n")
    assert load_recipe(path).precision.mixed == "no"
    assert load_recipe(TINY, ["precision.mixed=no"]).precision.mixed == "no"


def test_recipe_errors_before_any_work(tmp_path):
    """The CLI exits with status 2 and a one-line message; nothing is written to the run directory."""
    from sak.cli import main

    path = write_variant(tmp_path, lambda d: d["run"].update(output_dir=str(tmp_path / "runs"), colour="red"))
    assert main(["train", str(path)]) == 2
    assert not (tmp_path / "runs").exists()


def test_overrides_parse_yaml_values_and_index_lists():
    recipe = load_recipe(TINY, ["optim.lr=1e-4", "teachers.1.weights=/x.safetensors", "logging.tensorboard=true"])
    assert recipe.optim.lr == pytest.approx(1e-4)
    assert recipe.teachers[1].weights == "/x.safetensors"
    assert recipe.logging.tensorboard is True


def test_override_errors():
    with pytest.raises(RecipeError, match="not of the form"):
        apply_override({}, "optim.lr")
    with pytest.raises(RecipeError, match="has 1 items"):
        apply_override({"teachers": [{}]}, "teachers.3.name=x")
    # these were tracebacks (TypeError, ValueError) rather than errors naming the override
    with pytest.raises(RecipeError, match=r"optim.betas.0 is a value, not a section"):
        apply_override({"optim": {"betas": [0.9, 0.99]}}, "optim.betas.0.x=1")
    with pytest.raises(RecipeError, match=r"teachers has 1 items; '²' is not an index"):
        apply_override({"teachers": [{}]}, "teachers.²=x")
    data = {"teachers": [None]}  # an item left empty in the file
    apply_override(data, "teachers.0.name=timm")
    assert data == {"teachers": [{"name": "timm"}]}


@pytest.mark.parametrize("entry", [123, ".relative", ""])
def test_an_imports_entry_that_is_not_a_module_name_is_named(entry, tmp_path):
    path = write_variant(tmp_path, lambda d: d.update(imports=[entry]))
    with pytest.raises(RecipeError, match=r"imports\[0\]: .* is not a module name; give an absolute dotted name"):
        load_recipe(path)


def test_imports_load_plugins_and_report_missing_modules(tmp_path):
    path = write_variant(tmp_path, lambda d: d.update(imports=["no_such_plugin_module"]))
    with pytest.raises(RecipeError, match=r"imports\[0\]: cannot import plug-in module 'no_such_plugin_module'"):
        load_recipe(path)


def importing(tmp_path, monkeypatch, name: str, code: str):
    """A recipe (the tiny one) whose `imports:` names plug-in module `name`, written with `code` in tmp_path."""
    (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_variant(tmp_path, lambda d: d.update(imports=[name]))


def test_a_plugin_that_registers_a_taken_name_is_named(tmp_path, monkeypatch):
    code = ("from sak.registry import TEACHERS\nfrom sak.teachers.timm_teacher import TimmTeacher\n"
            "TEACHERS.register('sam')(type('Other', (TimmTeacher,), {}))\n")  # fmt: skip
    path = importing(tmp_path, monkeypatch, "twice_plugin", code)
    with pytest.raises(
        RecipeError, match=r"imports\[0\]: plug-in module 'twice_plugin': teacher 'sam' is registered twice"
    ):
        load_recipe(path)


def test_schedule_needs_exactly_one_length():
    with pytest.raises(RecipeError, match="exactly one of schedule.max_steps and schedule.epochs"):
        load_recipe(TINY, ["schedule.epochs=2"])


def test_show_round_trips(tmp_path):
    recipe = load_recipe(TINY)
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe


def test_cli_recipe_show_and_check(capsys):
    from sak.cli import main

    assert main(["recipe", "show", str(TINY), "optim.lr=0.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optim"]["lr"] == 0.5 and shown["teachers"][0]["name"] == "timm"
    assert main(["recipe", "check", str(TINY)]) == 0
    out = capsys.readouterr().out
    assert "ok (2 teacher(s), 0 task(s), stage distill)" in out and "note:" not in out


def test_cli_recipe_check_notes_what_this_machine_and_directory_lack(capsys, tmp_path, monkeypatch):
    """A valid recipe that `sak train` would refuse here (fp16 without CUDA, a data.root, data.subset or
    cache.path that is not there from this directory) passes the check with a note for each: it may be meant
    for another machine."""
    from sak.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "ids.txt").write_text("a\n")
    args = ["precision.mixed=fp16", "data.name=image_folder", "data.options={}", "data.root=images",
            "data.subset=missing.txt", "checkpoint.init_from=runs/stage1", "cache.path=cache",
            "checkpoint.resume=Never"]  # fmt: skip
    assert main(["recipe", "check", str(TINY), *args]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 6 and "fp16 needs a CUDA GPU" in notes[0]
    assert "data.root 'images' is not a directory here" in notes[1] and "'missing.txt' is not a file" in notes[2]
    assert "checkpoint.init_from 'runs/stage1' is not there" in notes[3]  # (a stage-2 recipe's stage-1 run)
    assert "checkpoint.resume 'Never' is not there" in notes[4] and "did you mean 'never'?" in notes[4]
    assert "cache.path 'cache' holds no teacher-feature cache here" in notes[5]
    (tmp_path / "images").mkdir()
    assert main(["recipe", "check", str(TINY), "data.name=image_folder", "data.options={}", "data.root=images",
                 "data.subset=ids.txt", "data.batch_size=1"]) == 0  # fmt: skip
    assert "note:" not in capsys.readouterr().out
    assert main(["recipe", "check", str(TINY), "data.name=image_folder", "data.options={}", "data.root=images",
                 "data.subset=ids.txt", "data.batch_size=4"]) == 0  # fmt: skip
    assert "note: data.subset 'ids.txt' lists 1 image(s), fewer than data.batch_size 4" in capsys.readouterr().out


def test_cli_recipe_check_notes_teacher_weights_that_building_would_refuse(capsys, tmp_path, monkeypatch):
    """A sha256 pinned to a hub tag (which cannot be checked) or a weights file that is not there passed the
    check and failed only when the teachers were built."""
    from sak.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"")
    pinned = "teachers.0.sha256=" + "0" * 64
    assert main(["recipe", "check", str(TINY), pinned, "teachers.0.weights=hub"]) == 0
    out = capsys.readouterr().out
    assert "note: teachers.0 (vit_a): sha256 needs a local weights file, and `weights` 'hub' is not one" in out
    assert main(["recipe", "check", str(TINY), "teachers.0.weights=gone/w.safetensors"]) == 0
    assert "note: teachers.0 (vit_a): weights 'gone/w.safetensors' is not there" in capsys.readouterr().out
    assert main(["recipe", "check", str(TINY), pinned, "teachers.0.weights=w.safetensors"]) == 0
    assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logging.every=0", "logging.every: must be at least 1, got 0"),
        ("checkpoint.every=-3", "checkpoint.every: must be at least 0, got -3"),
        ("eval.batch_size=0", "eval.batch_size: must be at least 1"),
        ("schedule.max_steps=-5", "schedule.max_steps: must be at least 1"),
        ("optim.betas=[0.9]", r"optim.betas: two numbers in \[0, 1\)"),
        ("loss.normalize_every=0", "loss.normalize_every: must be at least 1, got 0"),
        ("loss.normalize_until=0", "loss.normalize_until: must be at least 1, got 0"),
        ("loss.normalize_until=sometimes", "loss.normalize_until: expected int | 'auto' | 'never', got 'sometimes'"),
        ("data.prefetch_to_device=sometimes", "data.prefetch_to_device: expected bool | 'auto', got 'sometimes'"),
        ("loss.options.bogus=1", "unknown key loss.options.bogus.*valid keys here"),
        ("loss.options.beta=abc", r"loss.options.beta: expected a number, got 'abc' \(str\)"),
        ("loss.options.cos_weight=[1]", r"loss.options.cos_weight: expected a number, got \[1\] \(list\)"),
        (
            "tasks.0.name=semseg",
            r"override 'tasks.0.name=semseg': tasks is not in the recipe; give the whole list, e.g. "
            r"'tasks=\[\{name: ...\}\]'",
        ),
        (
            "student.levels.0=3",
            r"override 'student.levels.0=3': student.levels is not in the recipe; give the whole list, e.g. "
            r"'student.levels=\[...\]'$",
        ),
        ("tasks=[{name: semseg}, {name: semseg}]", r"tasks\[1\]: the task 'semseg' is listed twice"),
        (
            "tasks=[{name: semseg}]",  # (tiny.yaml is stage 1: the task was trained as in stage 2)
            r"tasks: a distillation recipe \(run.stage: distill, stage 1\) trains no tasks, but it lists "
            r"\['semseg'\]; set run.stage=multitask",
        ),
        # values in range for their type that made a run go wrong silently or fail later with a traceback
        ("optim.grad_clip=-1", r"optim.grad_clip: must be a finite number, positive, got -1.0"),
        ("optim.grad_clip=0", r"optim.grad_clip: must be a finite number, positive, got 0.0"),
        ("optim.lr=.nan", r"optim.lr: must be a finite number, positive, got nan"),
        ("optim.lr=.inf", r"optim.lr: must be a finite number, positive, got inf"),
        ("optim.eps=0", r"optim.eps: must be a finite number, positive"),
        ("optim.weight_decay=-0.1", r"optim.weight_decay: must be a finite number, zero or more, got -0.1"),
        ("loss.alpha=-1", r"loss.alpha: must be a finite number, zero or more"),
        ("schedule.power=-1", r"schedule.power: must be a finite number, positive"),
        ("schedule.min_lr=1", r"schedule.min_lr: the cosine floor must be in \[0, optim.lr = 0.001\], got 1.0"),
        ("schedule.min_lr=-1", r"schedule.min_lr: the cosine floor must be in \[0, optim.lr = 0.001\], got -1.0"),
        ("student.down_ratio=0", "student.down_ratio: must be at least 1, got 0"),
        ("student.levels=[]", "student.levels: give the stem blocks that feed the levels, or null"),
        ("teachers.0.image_size=-5", r"teachers\[0\].image_size: must be at least 1, got -5"),
        (
            "teachers.0.key=a.b",
            r"teachers\[0\].key: 'a.b' names the teacher's outputs .*without '.' or '/', e.g. 'a_b'",
        ),
        (
            "teachers.0.key=a/b",
            r"teachers\[0\].key: 'a/b' names the teacher's outputs .*without '.' or '/', e.g. 'a_b'",
        ),
        ("loss.normalize_every=10", "loss.normalize_every: 10 would go unused with loss.normalize: none"),
        ("schedule.max_steps=null", r"exactly one of schedule.max_steps and schedule.epochs \(set the other to null"),
        ("data.options={length: 8", "override 'data.options={length: 8': the value is not valid YAML"),
        ("optim.lr=!!python/name:os.system", "not valid YAML"),
        (
            "teachers.0.options.model_kwargs={pretrained: evil.pt, weights_only: false}",
            r"teachers\[0\].options.model_kwargs: pretrained, weights_only load weights by the model library's own "
            r"route, .* give the weights as teachers\[0\].weights",
        ),
        (
            "student.model_kwargs={checkpoint_path: other.pth}",
            "student.model_kwargs: checkpoint_path load weights .* give the weights as student.pretrained",
        ),
        (  # a plug-in option `weights` became the teacher's weights file, `name` a TypeError at build
            "teachers.0.options={weights: extra.bin}",
            r"teachers\[0\].options.weights: sak passes a teacher's options beside its name, weights and spec",
        ),
        (  # open_clip's tower configs load a pretrained transformers / timm model of their own (were accepted)
            "teachers.0.options.model_kwargs={text_cfg: {hf_model_name: bert-base-uncased}, "
            "vision_cfg: {timm_model_pretrained: true}}",
            r"model_kwargs: text_cfg.hf_model_name \(with hf_model_pretrained not false\), "
            r"vision_cfg.timm_model_pretrained load weights by the model library's own route",
        ),
    ],
)
def test_values_that_would_fail_later_are_refused_with_the_key(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(TINY, [override])


def test_loader_keywords_that_load_nothing_are_accepted():
    """Only a value that loads weights is refused: open_clip's `pretrained_text` defaults to true, and false is
    how a custom model with a Hugging Face text tower keeps from downloading it."""
    kwargs = "{pretrained_text: false, load_weights: false, weights_only: true, pretrained: null, cache_dir: /scratch}"
    recipe = load_recipe(TINY, [f"teachers.0.options.model_kwargs={kwargs}"])
    assert recipe.teachers[0].options["model_kwargs"]["weights_only"] is True
    towers = "{text_cfg: {hf_model_name: bert-base-uncased, hf_model_pretrained: false}, vision_cfg: {layers: 2}}"
    load_recipe(TINY, [f"teachers.0.options.model_kwargs={towers}"])  # a transformers text tower, built untrained


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tasks.0.channels=-3", r"tasks\[0\] \(semseg\): channels -3: the semseg head's channels must be at least 1"),
        ("tasks.0.channels=0", r"tasks\[0\] \(semseg\): channels 0: .* at least 1"),  # (was the default, 5)
        ("tasks.4.channels=4", r"tasks\[4\] \(normals\): channels 4: the normals head's channels must be 3 or left"),
        ("tasks.2.channels=1", r"tasks\[2\] \(saliency\): channels 1: .* must be 2 or left out"),
        ("tasks.0.weight=-1", r"tasks\[0\].weight: must be a finite number, zero or more, got -1.0"),
    ],
)
def test_task_channels_and_weights_out_of_range_are_refused_with_the_key(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(TINY_MULTITASK, [override])
    assert load_recipe(TINY_MULTITASK, ["tasks.4.channels=3"]).tasks[4].channels == 3


def test_min_lr_is_the_cosine_schedules_alone():
    with pytest.raises(RecipeError, match=r"schedule.min_lr: the cosine floor must be in \[0, optim.lr"):
        load_recipe(TINY, ["schedule.min_lr=1"])
    with pytest.raises(RecipeError, match="schedule.min_lr: 1.0 would go unused with schedule.name 'poly'"):
        load_recipe(TINY, ["schedule.name=poly", "schedule.min_lr=1"])


def test_options_of_a_loss_without_its_own_init_are_checked():
    """nn.Module's (*args, **kwargs) signature let any key through: `loss.distill=mse loss.options.cos_weight=.5`
    passed `sak recipe check` and failed with a TypeError traceback when training built the loss."""
    with pytest.raises(RecipeError, match=r"unknown key loss.options.cos_weight; valid keys here: \(none\)"):
        load_recipe(TINY, ["loss.distill=mse", "loss.options.cos_weight=0.5"])
    assert load_recipe(TINY, ["loss.distill=mse"]).loss.options == {}


def test_loss_options_take_the_loss_keywords_types():
    """YAML 1.1 reads `1e-3` as a string; the loss's annotations make it the number the loss expects (it used to
    reach the loss as '1e-3' and fail when training started). A plug-in keyword annotated with a type the
    recipe schema does not know, or not at all, is passed as written."""
    import torch

    from sak.config.load import _check_keywords

    recipe = load_recipe(TINY, ["loss.options={beta: 1e-3, cos_weight: 1}"])
    assert recipe.loss.options == {"beta": 0.001, "cos_weight": 1.0}
    assert type(recipe.loss.options["cos_weight"]) is float

    def plug_in(weights: torch.Tensor | None = None, scale=2, mode: str = "a"):
        pass

    given = {"weights": "w", "scale": "3", "mode": "b"}
    assert _check_keywords(plug_in, given, "loss.options") == given


def test_an_unknown_key_where_none_are_accepted_says_so():
    """dinov2_imgfocus takes no options: the list of valid keys used to come out empty."""
    demo = REPO / "recipes" / "demo" / "default.yaml"
    with pytest.raises(RecipeError, match=r"unknown key 'teachers\[0\].options.foo'; valid keys here: \(none\)$"):
        load_recipe(demo, ["teachers.0.options.foo=1"])


def test_a_task_the_dataset_has_no_targets_for_is_a_recipe_error():
    """Caught by `sak recipe check`, not only when `sak train` builds the dataset."""
    demo = REPO / "recipes" / "demo" / "default.yaml"
    with pytest.raises(RecipeError, match=r"tasks: data.name 'package_images' has no targets for \['semseg'\]"):
        load_recipe(demo, ["tasks=[{name: semseg, channels: 21}]"])
    with pytest.raises(RecipeError, match=r"'nyud' has no targets for \['parts', 'saliency'\]; it has \['semseg'"):
        load_recipe(
            TINY, ["data.name=nyud", "data.options={}", "tasks=[{name: semseg}, {name: parts}, {name: saliency}]"]
        )


def test_a_class_count_the_dataset_does_not_have_is_a_recipe_error():
    """A NYUD recipe whose semseg head kept the default 21 channels (NYUD has 40 classes) passed the check and
    failed at the first step with `IndexError: Target 39 is out of bounds` (a device-side assert on CUDA)."""
    nyud = ["data.name=nyud", "data.options={}"]
    with pytest.raises(RecipeError, match=r"tasks\[0\] \(semseg\): the head would predict 21 channels \(the default\), "
                                          r"but nyud has 40 classes; set channels: 40$"):  # fmt: skip
        load_recipe(TINY_MULTITASK, [*nyud, "tasks=[{name: semseg}, {name: depth}]"])
    pascal = ["data.name=pascal_context", "data.options={}", "tasks=[{name: semseg}, {name: parts, channels: 8}]"]
    with pytest.raises(RecipeError, match=r"tasks\[1\] \(parts\): the head would predict 8 channels, but pascal_con"):
        load_recipe(TINY_MULTITASK, pascal)
    assert load_recipe(TINY_MULTITASK, [*nyud, "tasks=[{name: semseg, channels: 40}]"]).tasks[0].channels == 40
    assert load_recipe(TINY_MULTITASK).tasks[0].channels == 5  # a dataset that fixes no class count: any


def test_an_adapter_for_a_student_without_adapter_paths_is_an_error(monkeypatch):
    from sak.registry import ADAPTERS

    monkeypatch.setitem(ADAPTERS._entries, "grid", object)  # a plug-in adapter type
    baseline = REPO / "recipes" / "baselines" / "many_to_one.yaml"
    assert load_recipe(baseline).student.architecture == "many_to_one"
    with pytest.raises(
        RecipeError, match=r"teachers\[0\].adapter: 'grid' would go unused: .*'many_to_one' has no adapter"
    ):
        load_recipe(baseline, ["teachers.0.adapter=grid"])


def test_warmup_in_steps_and_in_epochs_together_is_an_error():
    """warmup_steps won silently: `schedule.warmup_epochs=1` on tiny.yaml (warmup_steps 2) changed nothing."""
    with pytest.raises(RecipeError, match=r"at most one of schedule.warmup_steps \(2\) and schedule.warmup_epochs"):
        load_recipe(TINY, ["schedule.warmup_epochs=1"])
    assert load_recipe(TINY, ["schedule.warmup_epochs=1", "schedule.warmup_steps=0"]).schedule.warmup_epochs == 1


def test_a_seed_numpy_cannot_take_is_a_recipe_error():
    for seed, why in (("-1", "run.seed: must be at least 0"), (str(2**32), "run.seed: must be below 2")):
        with pytest.raises(RecipeError, match=why):
            load_recipe(TINY, [f"run.seed={seed}"])


def test_freezing_all_but_routers_without_tasks_is_refused():
    """Stage 1 has no routers or heads: the recipe was accepted and training stopped at step 1 with autograd's
    "element 0 of tensors does not require grad"."""
    with pytest.raises(RecipeError, match="student.freeze: all_but_routers trains only the routers and task heads"):
        load_recipe(TINY, ["student.freeze=all_but_routers"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["schedule.name=poly", "schedule.min_lr=1e-6"], "schedule.min_lr: 1e-06 would go unused with schedule.name 'poly'"),
        (["schedule.power=2.0"], "schedule.power: 2.0 would go unused with schedule.name 'cosine'"),
        (["schedule.min_lr=.nan"], "schedule.min_lr: the cosine floor must be in"),
        (["schedule.max_steps=null", "schedule.epochs=2", "schedule.warmup_steps=0", "schedule.warmup_epochs=.inf"], "schedule.warmup_epochs: must be a finite"),
        (["loss.alpha=0.5"], "loss.alpha: 0.5 weighs the distillation loss against the task losses"),
        (["loss.options={l1_weight: -5}"], "loss.options.l1_weight: must be a finite number, zero or more, got -5"),
        (["student.architecture=many_to_one", "student.down_ratio=16"], "student.down_ratio: 16 would go unused"),
        (["run.name=.."], r"run.name: '\.\.' names the run's folder"),
        (["run.name=a/b"], "run.name: 'a/b' names the run's folder"),
        (["run.name=" + "a" * 256], "run.name: 'a{80}' names the run's folder .* at most 255 bytes"),
        (["schedule.max_steps=010"], r"schedule.max_steps: expected an integer, got '010'"),  # YAML 1.1: octal 8
        (["optim.lr=1:30.5"], r"optim.lr: expected a number, got '1:30.5'"),  # YAML 1.1: base-60, 90.5
        (["run.name=2024"], r"run.name: expected a string, got 2024 \(int\); quote it \(YAML read it as a number\)"),
        (["data.split=on"], r"data.split: expected a string, got True \(bool\); quote it \(YAML reads yes / no / on"),
        (["optim.grad_clip=None"], r"optim.grad_clip: expected a number, got 'None' \(str\); YAML's null is written null"),
        (["schedule.max_steps=2e3"], r"schedule.max_steps: expected an integer, got 2000.0 \(float\); write 2000"),
        (["cache.path="], "cache.path: an empty value names no file or folder; give a path, or null"),  # ('.' later)
        (["checkpoint.resume="], "checkpoint.resume: an empty value .*give a path, or 'auto' or 'never'"),
        (["teachers.1.weights="], r"teachers\[1\].weights: an empty value names no file or folder"),
    ],
)  # fmt: skip
def test_settings_that_would_go_unused_or_train_otherwise_than_asked_are_refused(overrides, message):
    """Each was accepted: a floor or exponent the schedule does not have, stage 1's alpha, a NaN floor, losses' negative weights, the SAK student's parts on the
    many-to-one baseline, run names that are not a folder of their own, and YAML 1.1's octal `010` read as 8 and
    base-60 `1:30.5` as 90.5."""
    with pytest.raises(RecipeError, match=message):
        load_recipe(TINY, overrides)


def test_an_empty_output_dir_is_the_current_directory_as_older_recipes_wrote_it():
    recipe = load_recipe(TINY, ["run.output_dir="])  # (other empty paths are refused: test above)
    assert recipe.run_dir == Path(recipe.run.name)


def test_a_plugin_options_field_without_a_default_left_out_is_a_recipe_error_naming_it():
    """A plug-in's Options with a required field (`model_id: str`) left out of the recipe gave a bare TypeError
    naming neither the section nor the key (and exit status 1)."""
    import dataclasses

    from sak.config import structure

    @dataclasses.dataclass
    class Options:
        model_id: str
        width: int = 8

    with pytest.raises(RecipeError, match=r"teachers\[0\].options: missing key\(s\) 'teachers\[0\].options.model_id', "
                       r"which .*Options has no default for"):  # fmt: skip
        structure(Options, {"width": 4}, "teachers[0].options")
    assert structure(Options, {"model_id": "m"}, "x") == Options("m", 8)


def test_a_misspelt_lora_key_is_named_by_the_recipe_not_after_the_teachers_are_built(capsys):
    """student.lora went to peft only when the student was built, after the teachers were loaded (or
    downloaded): `recipe check` said ok."""
    from sak.cli import main

    with pytest.raises(
        RecipeError, match=r"student.lora: unknown key\(s\) \['rr'\] of peft's LoraConfig; did you mean 'r'"
    ):
        load_recipe(TINY, ["student.lora={rr: 8}"])
    with pytest.raises(RecipeError, match=r"student.lora .*`layers_to_transform` must also be specified"):
        load_recipe(TINY, ["student.lora={r: 8, layers_pattern: blocks}"])
    assert main(["recipe", "check", str(TINY), "student.lora={rr: 8}"]) == 2
    assert "student.lora: unknown key(s) ['rr']" in capsys.readouterr().err
    assert load_recipe(TINY, ["student.lora={r: 4, lora_alpha: 8, target_modules: [qkv]}"]).student.lora["r"] == 4
    # what peft checks only when it injects (into the stem's ViT, built on the meta device for the check)
    for lora, said in (("{r: 0, target_modules: [qkv]}", "`r` should be a positive integer"),
                       ("{r: 4}", "Please specify `target_modules`"), ("{r: 4, target_modules: [nope]}", "{'nope'} not found")):  # fmt: skip
        with pytest.raises(RecipeError, match=re.escape(said)):
            load_recipe(TINY, [f"student.lora={lora}"])
