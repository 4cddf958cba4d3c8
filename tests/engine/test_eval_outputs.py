"""What `sak eval`, `eval-preds` and `predict` write never replaces one of their inputs, and is checked before
any image is scored."""

import json

import pytest

from sak.cli import main

from .test_task_eval import evaluated, trained  # noqa: F401  (module fixtures: a trained run and its scores)


def test_an_out_onto_an_input_is_refused_before_scoring(trained, evaluated, tmp_path, capsys):  # noqa: F811
    """`--out` onto the recipe, the reference, a file in data.root or --preds replaced it with the result JSON;
    `--out` equal to --save-preds failed after the whole evaluation."""
    recipe_file, run_dir, root = trained
    _, preds = evaluated
    reference = tmp_path / "ref.json"
    reference.write_text(json.dumps({"semseg": 50.0}))
    split_file = next(root.rglob("val.txt"))
    before = {f: f.read_bytes() for f in (recipe_file, reference, split_file)}
    evaluate = ["eval", str(recipe_file), "--checkpoint", str(run_dir)]
    score = ["eval-preds", "--dataset", "pascal_context", "--root", str(root), "--preds", str(preds)]
    for argv, out in (
        (evaluate, recipe_file),
        ([*evaluate, "--reference", str(reference)], reference),
        (evaluate, split_file),
        ([*evaluate, "--save-preds", str(tmp_path / "same")], tmp_path / "same"),
        ([*score, "--reference", str(reference)], reference),
        (score, preds / "semseg" / "x.json"),
        (score, split_file),
        (evaluate, run_dir / "checkpoints" / "step_00000002" / "model.safetensors"),
    ):
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is (or is in) " in err and "an input of this command" in err, err
    assert all(f.read_bytes() == data for f, data in before.items())
    # a new file beside the inputs replaces nothing (eval-preds scores only the task folders), nor does a result
    # written in the run directory before (a rerun)
    assert main([*score, "--out", str(preds / "results.json")]) == 0
    (preds / "results.json").unlink()
    for out in (run_dir / "eval.json", root / "eval.json"):  # (data.root: an existing file there that sak wrote)
        for _ in range(2):
            assert main([*evaluate, "--out", str(out)]) == 0, capsys.readouterr().err
        out.unlink()


def test_predictions_are_not_written_into_the_dataset_nor_onto_a_file(trained, tmp_path, capsys):  # noqa: F811
    """--save-preds onto NYUD-v2's root replaced its depth/ and normals/ ground truth (the predictions' layout);
    onto a file it failed after the first batch ("Not a directory: 'afile/semseg'"). An earlier run's task
    folders the new one does not write are named: eval-preds would score them with this run's."""
    recipe_file, run_dir, root = trained
    evaluate = ["eval", str(recipe_file), "--checkpoint", str(run_dir)]
    (tmp_path / "afile").write_text("")
    for folder, said in ((root, "overlaps data.root"),
                         (tmp_path / "afile", "a file; give a folder for the predictions")):  # fmt: skip
        assert main([*evaluate, "--save-preds", str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"--save-preds {folder}" in err and said in err, err
    assert main(["predict", str(tmp_path / "no-export"), "x.png", "--out", str(tmp_path / "afile")]) == 2
    assert "--out " in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    (mixed / "depth").mkdir(parents=True)
    (mixed / "depth" / "a.npy").write_bytes(b"")
    with pytest.warns(RuntimeWarning, match=rf"--save-preds {mixed} holds depth of an earlier run, which this one"):
        assert main([*evaluate, "--save-preds", str(mixed), "--out", str(tmp_path / "r.json")]) == 0


def test_a_task_named_by_a_file_in_the_predictions_is_an_error(trained, evaluated, tmp_path, capsys):  # noqa: F811
    """A file `edges` in place of the folder left edges unscored without a word, and delta_m moved."""
    import shutil

    _, _, root = trained
    _, preds = evaluated
    copy = shutil.copytree(preds, tmp_path / "preds")
    shutil.rmtree(copy / "edges")
    (copy / "edges").write_text("")
    args = ["eval-preds", "--dataset", "pascal_context", "--root", str(root), "--preds", str(copy)]
    assert main(args) == 2
    assert f"{copy}: edges is a file, not a folder of predictions" in capsys.readouterr().err
    assert main([*args, "--tasks", "semseg"]) == 0
