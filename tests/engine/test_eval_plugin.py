"""`sak eval` of a plug-in dataset: its supported tasks that have a metric, scored with its class counts (or
the heads') and its metric options; no published row, so delta_m only against a user's --reference."""

import dataclasses

import pytest

from sak.cli import main
from sak.data import DatasetSpec
from sak.data.synthetic import SyntheticDataset
from sak.engine import train
from sak.engine.predictions import read_prediction
from sak.engine.task_eval import EvalError, evaluate_student
from sak.metrics import build_metric
from sak.registry import DATASETS

from ..conftest import TESTS


@DATASETS.register("test_scored_synthetic")
class ScoredSynthetic(SyntheticDataset):
    """The generated dataset as a plug-in, its boundaries scored with a tolerance of its own."""

    metric_options = {"edges": {"tolerance": 0.02}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from accelerate.state import AcceleratorState, GradientState

    from sak.config import load_recipe

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out = tmp_path_factory.mktemp("plugin_eval")
    overrides = [f"run.output_dir={out}", "data.name=test_scored_synthetic", "schedule.max_steps=2", "eval.batches=1",
                 "data.options.length=6", "tasks=[{name: semseg, channels: 5}, {name: edges}, {name: depth}]"]  # fmt: skip
    recipe = load_recipe(TESTS / "tiny_multitask.yaml", overrides)
    train(recipe)
    return recipe


def test_a_plug_in_dataset_is_scored_on_its_tasks_with_its_options(run, tmp_path):
    """`sak eval` knew PASCAL-Context and NYUD-v2 only: "task evaluation knows the datasets [...], not ..."."""
    result = evaluate_student(run, run.run_dir, save_preds=tmp_path / "preds", progress=False)
    assert result["n_images"] == 6 and set(result["tasks"]) == {"semseg", "edges", "depth"}
    assert result["delta_m"] is None and result["reference"] == {"source": "none"}
    # the semseg score is the mIoU of the saved predictions over the split's 5 classes (the head's channels)
    dataset = ScoredSynthetic(DatasetSpec(split="val", image_size=64, tasks=("semseg",), train=False),
                              ScoredSynthetic.Options(length=6))  # fmt: skip
    metric = build_metric("semseg", num_classes=5)
    for k in range(len(dataset)):
        sample = dataset[k]
        metric.update(read_prediction(tmp_path / "preds", "semseg", sample["id"])[None], sample["semseg"][None])
    assert result["tasks"]["semseg"]["mIoU"] == pytest.approx(metric.compute()["mIoU"], abs=1e-9)
    assert evaluate_student(run, run.run_dir, reference={"semseg": 50.0}, progress=False)["delta_m"] is not None


def test_the_metric_options_and_what_a_plug_in_cannot_be_scored_on(run, monkeypatch, capsys):
    from sak.engine import task_eval

    seen = {}
    real = task_eval.SampleScores.__init__

    def spy(self, dataset, tasks, options=None):
        seen.update(options or {})
        real(self, dataset, tasks, options)

    monkeypatch.setattr(task_eval.SampleScores, "__init__", spy)
    evaluate_student(run, run.run_dir, progress=False)
    assert seen == {"semseg": {"num_classes": 5}, "edges": {"tolerance": 0.02}, "depth": {}}
    monkeypatch.setattr(ScoredSynthetic, "supported_tasks", ("fg",))
    with pytest.raises(EvalError, match="'test_scored_synthetic' has none"):
        evaluate_student(run, run.run_dir, progress=False)
    monkeypatch.undo()
    recipe_file = run.run_dir / "recipe.yaml"
    argv = ["eval", str(recipe_file), "--checkpoint", str(run.run_dir), "imports=[tests.engine.test_eval_plugin]"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert '"dataset": "test_scored_synthetic"' in out and '"n_images": 6' in out


@DATASETS.register("test_sizeless_synthetic")
class Sizeless(SyntheticDataset):
    """Evaluation samples without their size."""

    def __getitem__(self, index):
        return {k: v for k, v in super().__getitem__(index).items() if k != "size"}


def test_evaluation_samples_without_their_size_are_said_to_lack_it(run):
    """It was a bare KeyError: 'size'."""
    from sak.config import load_recipe

    with pytest.raises(EvalError, match="Sizeless's evaluation samples carry no 'size', the original"):
        sizeless = load_recipe(run.run_dir / "recipe.yaml", ["data.name=test_sizeless_synthetic"])
        evaluate_student(sizeless, run.run_dir, progress=False)


def test_a_plug_ins_bad_metric_options_and_the_heads_left_unscored_are_said(run, monkeypatch):
    """A misspelt metric option was build_metric's words alone; a head without a metric was left out silently."""
    monkeypatch.setattr(ScoredSynthetic, "metric_options", {"semseg": {"ignore": 255}})
    with pytest.raises(EvalError, match=r"dataset 'test_scored_synthetic': its metric_options .*unknown option"):
        evaluate_student(run, run.run_dir, progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(ScoredSynthetic, "supported_tasks", ("semseg", "edges"))  # (depth: no longer scored)
    with pytest.warns(RuntimeWarning, match=r"the student's \['depth'\] have no metric on test_scored_synthetic"):
        assert set(evaluate_student(run, run.run_dir, progress=False)["tasks"]) == {"semseg", "edges"}


def test_eval_refuses_a_dataset_without_a_task_that_has_a_metric():
    from sak.engine.task_eval import EvalError, check_dataset

    with pytest.raises(EvalError, match="scores pascal_context, nyud and datasets whose supported_tasks have a metric"
                                        r" \(.*semseg.*\); 'package_images' has none"):  # fmt: skip
        check_dataset("package_images")
    check_dataset("synthetic")  # (its tasks have metrics, and its evaluation samples their size)
    with pytest.raises(EvalError, match="unknown dataset 'nosuch' \\(a plug-in's module not in the recipe's imports"):
        check_dataset("nosuch")


@DATASETS.register("test_scored_at_64")
class ScoredAt64(ScoredSynthetic):
    """The plug-in at the run's image size, whatever the spec says (eval-preds has no recipe to give it)."""

    def __init__(self, spec, options):
        super().__init__(dataclasses.replace(spec, image_size=64), options)


def test_eval_preds_scores_a_plug_in_datasets_saved_predictions_as_sak_eval_does(run, tmp_path, monkeypatch, capsys):
    """eval-preds took pascal_context and nyud only (a KeyError from Python for another dataset)."""
    from sak.engine.task_eval import score_prediction_dir

    evaluated = evaluate_student(run, run.run_dir, save_preds=tmp_path / "preds", progress=False)

    def scored(*tasks):
        return score_prediction_dir("test_scored_at_64", None, "val", tmp_path / "preds", list(tasks) or None,
                                    options={"length": 6}, progress=False)["tasks"]  # fmt: skip

    assert scored("edges", "depth") == {t: evaluated["tasks"][t] for t in ("edges", "depth")}  # (bit for bit)
    with pytest.raises(EvalError, match=r"does not fix the classes of \['semseg'\] \(its task_classes\)"):
        scored()
    monkeypatch.setattr(ScoredSynthetic, "task_classes", {"semseg": 5})  # (fixed: scored as sak eval scores it)
    assert scored() == evaluated["tasks"]
    argv = ["eval-preds", "--dataset", "test_scored_at_64", "--preds", str(tmp_path / "preds"), "--root", str(tmp_path),
            "--import", "tests.engine.test_eval_plugin"]  # fmt: skip
    assert main(argv) == 2  # (its 64 default samples: no prediction of the 7th)
    assert "val_000006.png" in capsys.readouterr().err
