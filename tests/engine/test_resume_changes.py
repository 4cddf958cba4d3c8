"""What a resume says changed since its checkpoint: the recipe's values, and the teachers as built (teachers.json),
whose values a recipe may leave to sak."""

import json

import pytest
import yaml

from sak.engine import train
from sak.engine.checkpoint import CheckpointError, latest_checkpoint, write_checksums
from sak.engine.run_records import recipe_changes


def test_each_start_is_recorded_and_a_changed_recipe_on_resume_is_named(tiny_recipe, capsys):
    """recipe.yaml and run_info.json describe the latest start; starts.jsonl keeps every start's, so a number
    logged before a resume still traces to the recipe that made it, and the resume says what changed."""
    recipe = tiny_recipe("checkpoint.every=2", "run.stop_at=2")
    train(recipe)
    (recipe.run_dir / "starts.jsonl").open("a").write('{"seed": 0, "world_si')  # a start killed while writing it
    train(tiny_recipe("checkpoint.every=2", "optim.lr=5.0e-2"))
    starts = [json.loads(x) for x in (recipe.run_dir / "starts.jsonl").read_text().splitlines()]
    assert [s["recipe"]["optim"]["lr"] for s in starts] == [1e-3, 5e-2]
    assert all("git_revision" in s and "command" in s for s in starts)
    out = capsys.readouterr()
    assert (
        "the recipe (its teachers, or the cache it reads) differs from the one" in out.out + out.err
        and "optim.lr: 0.001 -> 0.05" in out.out + out.err
    )
    assert (
        "run.stop_at"
        not in (out.out + out.err).split("the recipe (its teachers, or the cache it reads) differs")[1].split("\n")[0]
    )


def test_a_key_added_to_the_schema_since_the_checkpoint_is_not_a_change(tiny_recipe, tmp_path):
    """An older run's recipe.yaml lacks keys added since (e.g. student.grad_checkpointing): at their defaults
    they are not reported as changed; set to something else, they are."""
    recipe = tiny_recipe("schedule.max_steps=1")
    train(recipe)
    saved = yaml.safe_load((recipe.run_dir / "recipe.yaml").read_text())
    del saved["student"]["grad_checkpointing"]
    del saved["teachers"][1]["normalization"]  # inside a list of sections too
    saved["teachers"][0] = dict(reversed(saved["teachers"][0].items()))  # (a hand-edited order is no change)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert recipe_changes(tmp_path / "recipe.yaml", recipe) == []
    changed = tiny_recipe(
        "schedule.max_steps=1",
        "student.grad_checkpointing=true",
        "teachers.1.normalization=imagenet",
        "teachers.0.image_size=70",
    )
    assert recipe_changes(tmp_path / "recipe.yaml", changed) == [
        "student.grad_checkpointing: None -> True",
        "teachers.0.image_size: None -> 70",
        "teachers.1.normalization: None -> 'imagenet'",
    ]


def test_a_teacher_built_otherwise_than_in_the_checkpoint_is_named_on_resume(tiny_recipe, capsys, monkeypatch):
    """A recipe that leaves a teacher's levels to sak resumed under a sak whose default levels changed (as on
    2026-11-29): the recipe is the same, the targets come from other blocks. Every checkpoint records the teachers
    as built (teachers.json), and the resume names the change."""
    from sak.teachers import base

    deeper = ["checkpoint.every=2", "teachers.0.options.model_kwargs.depth=8"]
    recipe = tiny_recipe(*deeper, "run.stop_at=2")
    train(recipe)
    saved = json.loads((latest_checkpoint(recipe.run_dir / "checkpoints") / "teachers.json").read_text())
    assert saved == json.loads((recipe.run_dir / "teachers.json").read_text())
    assert [saved[t]["levels"] for t in ("vit_a", "vit_b")] == [[1, 3, 5, 7], [0, 1, 2, 3]]
    capsys.readouterr()
    rule = base.default_levels
    monkeypatch.setattr(base, "default_levels", lambda depth, count=4: [0, 2, 4, 7] if depth == 8 else rule(depth))
    train(tiny_recipe(*deeper, "run.stop_at=4"))
    said = capsys.readouterr()
    message = (said.out + said.err).split("differs from the one")[1].split("\n")[0]
    assert message.endswith("teacher vit_a levels: [1, 3, 5, 7] -> [0, 2, 4, 7]. recipe.yaml now holds this one; "
                            "starts.jsonl has every start's recipe")  # fmt: skip
    assert "vit_b" not in message


def test_a_damaged_teachers_record_is_named_with_the_checkpoint(tiny_recipe):
    """teachers.json cut short in the checkpoint (its checksum rewritten, as a copy made after the damage would):
    the resume names the checkpoint and the file rather than a bare JSONDecodeError."""
    recipe = tiny_recipe("checkpoint.every=2", "run.stop_at=2")
    train(recipe)
    checkpoint = latest_checkpoint(recipe.run_dir / "checkpoints")
    (checkpoint / "teachers.json").write_text('{"vit_a": {"lev')
    write_checksums(checkpoint)
    with pytest.raises(
        CheckpointError, match=r"step_00000002: a file of it is damaged or unreadable \(teachers\.json: "
    ):
        train(tiny_recipe("checkpoint.every=2", "run.stop_at=4"))


def test_a_checkpoint_without_a_teachers_record_resumes(tiny_recipe):
    """Checkpoints written before teachers.json existed (sak before 2026-11-30) resume as before."""
    recipe = tiny_recipe("checkpoint.every=2", "run.stop_at=2")
    train(recipe)
    checkpoint = latest_checkpoint(recipe.run_dir / "checkpoints")
    (checkpoint / "teachers.json").unlink()
    write_checksums(checkpoint)
    train(tiny_recipe("checkpoint.every=2", "run.stop_at=4"))
    assert latest_checkpoint(recipe.run_dir / "checkpoints").name == "step_00000004"


def test_a_teacher_added_or_removed_is_one_entry_not_one_per_value(tmp_path):
    """A teacher on one side only (another `key`, one more teacher) was reported value by value: 34 entries."""
    from sak.engine.run_records import teacher_changes

    levels = {"levels": [2, 5, 8, 11], "embed_dim": 768, "name": "dinov2"}
    (tmp_path / "teachers.json").write_text(json.dumps({"a": levels, "b": {**levels, "name": "clip"}}))
    now = {"a": {**levels, "levels": [3, 5, 8, 11]}, "c": levels}
    assert teacher_changes(tmp_path / "teachers.json", now) == [
        "teacher b: removed",
        "teacher c: added",
        "teacher a levels: [2, 5, 8, 11] -> [3, 5, 8, 11]",
    ]
