"""`checkpoint.init_from`: a new run started from another run's student weights, and what it says of them."""

import pytest
import torch
from safetensors.torch import save_file

from sak.config import load_recipe
from sak.engine import train
from sak.engine.build import build_student, build_tasks, build_teachers
from sak.engine.init import init_run_from, init_student_from

from ..conftest import TESTS


def multitask(*overrides):
    recipe = load_recipe(TESTS / "tiny_multitask.yaml", list(overrides))
    return build_student(recipe, build_teachers(recipe, torch.device("cpu")), build_tasks(recipe))


def test_the_log_names_the_new_heads_of_a_run_started_from_a_stage_2_run(tmp_path):
    """From a stage-2 run of semseg alone, a run with saliency too said "new here, not in them: heads, routers",
    though semseg's head and routers came from that run."""
    one = multitask("tasks=[{name: semseg, channels: 5}]")
    save_file({k: v.contiguous() for k, v in one.state_dict().items()}, str(tmp_path / "s2.safetensors"))
    two = multitask("tasks=[{name: semseg, channels: 5}, {name: saliency}]")
    note = init_run_from(two, None, tmp_path / "s2.safetensors")
    assert note.endswith("(checkpoint.init_from); new here, not in them: heads.saliency, routers.saliency"), note
    assert torch.equal(two.heads.semseg.classifier.weight, one.heads.semseg.classifier.weight)


def test_init_from_another_students_weights_is_one_error_naming_the_misfits(tmp_path):
    """Not load_state_dict's RuntimeError with a line per mismatched tensor: the count, the first few with
    both shapes, and what to look at."""

    def student(*overrides):
        recipe = load_recipe(TESTS / "tiny.yaml", list(overrides))
        return build_student(recipe, build_teachers(recipe, torch.device("cpu")), {})

    save_file({k: v.contiguous() for k, v in student().state_dict().items()}, str(tmp_path / "narrow.safetensors"))
    wide = student("student.model_kwargs.embed_dim=48")
    with pytest.raises(ValueError) as exc:
        init_student_from(wide, tmp_path / "narrow.safetensors")
    message = str(exc.value)
    assert "narrow.safetensors" in message and "weight(s) have other shapes than this student's" in message
    assert "stem.vit.cls_token (1, 1, 32) in the file, (1, 1, 48) here" in message and "\n" not in message
    # a stem with register tokens: the file and the position embeddings' shapes, not "not a square grid"
    save_file({k: v.contiguous() for k, v in student("student.model_kwargs.reg_tokens=4").state_dict().items()},
              str(tmp_path / "registers.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match=r"registers.safetensors.*stem.vit.pos_embed \(1, 21, 32\) in the file"):
        init_student_from(student(), tmp_path / "registers.safetensors")

    # a stage-2 run of another dataset: only its heads differ, which the advice names
    save_file({k: v.contiguous() for k, v in multitask().state_dict().items()}, str(tmp_path / "s2.safetensors"))
    with pytest.raises(ValueError, match=r"heads.semseg.* that run trained other task heads \(tasks\[\].channels"):
        init_student_from(multitask("tasks.0.channels=7"), tmp_path / "s2.safetensors")
    # ...and one of another number of teachers: only its routers differ (the aligners are the new teacher's)
    with pytest.raises(ValueError, match=r"routers.* that run trained routers over another number of teachers"):
        init_student_from(multitask("teachers=[{name: timm, key: vit_a, options: {model: vit_small_patch14_dinov2, "
                                    "model_kwargs: {embed_dim: 48, depth: 4, num_heads: 2, img_size: 56}}}]"),
                          tmp_path / "s2.safetensors")  # fmt: skip


def test_init_from_a_run_fed_otherwise_normalised_images_is_refused(tiny_recipe):
    """Stage 2 took its student's mean / std from its own recipe: a stage 1 with student.normalization: imagenet
    (or a tag of other statistics) went on with 0.5 / 0.5 inputs, silently."""
    from sak.engine.init import saved_normalization

    stage1 = tiny_recipe("run.name=s1", "schedule.max_steps=1", "student.normalization=imagenet")
    train(stage1)
    weights = stage1.run_dir / "checkpoints" / "step_00000001" / "model.safetensors"
    assert saved_normalization(weights) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    stage2 = ["run.name=s2", "schedule.max_steps=1", f"checkpoint.init_from={stage1.run_dir}"]
    with pytest.raises(ValueError, match=r"that run fed its student images normalised by mean \(0.485, 0.456, "
                       r"0.406\).*this recipe's gets \(0.5, 0.5, 0.5\)"):  # fmt: skip
        train(tiny_recipe(*stage2, path=TESTS / "tiny_multitask.yaml"))
    train(tiny_recipe(*stage2, "student.normalization=imagenet", path=TESTS / "tiny_multitask.yaml"))
    # a tag in the model's name resolves as the stem resolves it (DINO's ImageNet statistics)
    tagged = tiny_recipe("run.name=s3", "schedule.max_steps=1", "student.model=vit_small_patch16_224.dino")
    train(tagged)
    student = build_student(tagged, build_teachers(tagged, torch.device("cpu")), {})
    saved = saved_normalization(tagged.run_dir / "checkpoints" / "step_00000001" / "model.safetensors")
    assert saved == (tuple(student.stem.mean), tuple(student.stem.std)) == saved_normalization(weights)


def test_init_from_an_export_says_it_lacks_the_aligners(tmp_path):
    """An export directory, or its student.safetensors, cannot start a training run when the student has
    aligners (distillation-only, not exported): both errors say so and what to give instead."""
    from sak.engine.export import export_student

    recipe = load_recipe(TESTS / "tiny.yaml", [f"run.output_dir={tmp_path}", "student.aligner=always"])
    student = build_student(recipe, build_teachers(recipe, torch.device("cpu")), {})
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(tmp_path / "s.safetensors"))
    export_student(recipe, tmp_path / "s.safetensors", tmp_path / "export")
    with pytest.raises(ValueError, match="'.*export' is an export \\(sak export\\), which keeps no .*aligners"):
        init_student_from(student, tmp_path / "export")
    with pytest.raises(ValueError, match="missing from the file: \\['aligners.*an export \\(sak export\\) drops"):
        init_student_from(student, tmp_path / "export" / "student.safetensors")
