"""The `sak` command: train, eval, eval-preds, recipe, teachers, model, cache, export, predict, viz, select."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .config import RecipeError, load_recipe
from .files import check_out, check_preds_folder


def _train(args) -> int:
    from .train import main as train_main

    return train_main([args.recipe, *args.overrides])


def _task_eval_errors():
    from .data.images import DataError
    from .engine.predictions import PredictionError
    from .engine.task_eval import EvalError

    return (EvalError, PredictionError, DataError, FileNotFoundError)


def _write_result(result: dict, out: str | None) -> None:
    from .engine.logging import json_safe
    from .engine.task_eval import format_summary
    from .files import write_text_whole

    text = json.dumps(json_safe(result), indent=2)  # a metric that scored nothing is NaN: null in JSON
    if out:
        try:
            write_text_whole(out, text + "\n")  # (an earlier result stays whole if this write fails)
        except OSError:
            print(text)  # not lost with the file (a full disk): the scores are on stdout
            raise
        print(format_summary(result))
        print(f"wrote {out}")
    else:
        print(text)


def _eval(args) -> int:
    from pathlib import Path

    from accelerate import PartialState

    from .engine.task_eval import evaluate_student, load_reference

    ck = Path(args.checkpoint)  # (its weights and records, not a result written beside them before: a rerun)
    own = [ck / n for n in ("model.safetensors", "student.safetensors", "student.yaml", "recipe.yaml",
                            "run_info.json", "metrics.jsonl", "starts.jsonl", "final_metrics.json")]  # fmt: skip
    step = [ck] if (ck / "trainer_state.json").is_file() else []  # (a checkpoint: every file of it)
    check_out(args.out, [args.recipe, args.reference, args.save_preds, ck, *own], [ck / "checkpoints", *step],
              [args.save_preds])  # fmt: skip
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_out(args.out, folders=[recipe.data.root])
        reference = load_reference(args.reference) if args.reference else None
        save = Path(args.save_preds) if args.save_preds else None
        if save is not None:
            check_preds_folder(save, "--save-preds", recipe.data.root)
        split = args.split if args.split is not None else recipe.eval.split  # (default: the recipe's, "val")
        result = evaluate_student(recipe, Path(args.checkpoint), split, save, reference)
    except _task_eval_errors() as exc:
        say_error(f"sak: error: {exc}")
        return 2
    if PartialState().is_main_process:
        _write_result(result, args.out)
    return 0


def _eval_preds(args) -> int:
    from .config import import_plugins
    from .engine.task_eval import load_reference, score_prediction_dir

    import_plugins(args.imports, where="--import")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    check_out(args.out, [args.reference, args.preds], [args.root], [args.preds])
    if args.eval_size and min(args.eval_size) < 1:
        raise ValueError(f"--eval-size {' '.join(map(str, args.eval_size))}: the canvas's height and width are "
                         "positive numbers of pixels")  # fmt: skip
    try:
        reference = load_reference(args.reference) if args.reference else None
        options = {"eval_size": list(args.eval_size)} if args.eval_size else None
        result = score_prediction_dir(args.dataset, args.root, args.split, args.preds, tasks, reference, options)
    except (*_task_eval_errors(), RecipeError) as exc:
        print(f"sak: error: {exc}", file=sys.stderr)
        return 2
    _write_result(result, args.out)
    return 0


def _recipe(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.action == "show":
        print(recipe.to_yaml(), end="")
    else:
        print(
            f"{args.recipe}: ok ({len(recipe.teachers)} teacher(s), {len(recipe.tasks)} task(s), stage {recipe.run.stage})"
        )
        for note in machine_notes(recipe):
            print(f"note: {note}")
    return 0


def machine_notes(recipe) -> list[str]:
    """What a valid recipe would meet on this machine, from this directory: `recipe check` says it without
    failing, since the recipe may be meant for another machine or another working directory."""
    import torch

    notes = []
    if not torch.cuda.is_available() and "fp16" in (recipe.precision.mixed, recipe.precision.teachers):
        notes.append(
            "precision fp16 needs a CUDA GPU, which this machine lacks: `sak train` refuses it here (bf16 or no)"
        )
    data = recipe.data
    if data.root is not None and not Path(data.root).is_dir():
        notes.append(f"data.root {data.root!r} is not a directory here (from {Path.cwd()})")
    if data.subset is not None and not Path(data.subset).is_file():
        notes.append(f"data.subset {data.subset!r} is not a file here (from {Path.cwd()})")
    elif data.subset is not None:  # (training refuses a split of fewer samples than one batch)
        from .data.base import read_manifest

        try:
            ids = len(read_manifest(data.subset))
        except (OSError, ValueError) as exc:
            notes.append(f"data.subset {data.subset!r} cannot be read: {exc}")
        else:
            if ids < data.batch_size:
                notes.append(f"data.subset {data.subset!r} lists {ids} image(s), fewer than data.batch_size "
                             f"{data.batch_size}: training refuses a split without one whole batch")  # fmt: skip
    start = recipe.checkpoint.init_from
    if start is not None and not Path(start).exists():  # (stage 2 names the stage-1 run made from the same folder)
        notes.append(f"checkpoint.init_from {start!r} is not there (from {Path.cwd()}): train that run first")
    resume = recipe.checkpoint.resume  # (auto, never, or a checkpoint directory: `Never` names a directory)
    if resume not in ("auto", "never") and not Path(resume).exists():
        case = f"; did you mean {resume.lower()!r}?" if resume.lower() in ("auto", "never") else ""
        notes.append(f"checkpoint.resume {resume!r} is not there (from {Path.cwd()}){case}")
    from .teachers.weights import is_local

    for i, t in enumerate(recipe.teachers):  # (building a teacher refuses both; the check builds none)
        if t.sha256 and not is_local(t.weights):
            notes.append(f"teachers.{i} ({t.id}): sha256 needs a local weights file, and `weights` "
                         f"{t.weights!r} is not one here: building the teacher refuses it")  # fmt: skip
        elif is_local(t.weights) and not Path(t.weights).expanduser().exists():
            notes.append(f"teachers.{i} ({t.id}): weights {t.weights!r} is not there (from {Path.cwd()})")
    cache = recipe.cache.path
    if cache is not None and not (Path(cache) / "manifest.json").is_file():
        notes.append(f"cache.path {cache!r} holds no teacher-feature cache here (from {Path.cwd()}): build it with "
                     "`sak cache build RECIPE --out DIR` first")  # fmt: skip
    return notes


def _teachers(args) -> int:
    from .config import import_plugins
    from .config.yaml_read import read_pairs
    from .teachers import create_teacher, list_teachers
    from .teachers.base import TeacherSpec

    import_plugins(args.imports, where="--import")
    if args.action == "list":
        for name in list_teachers():
            print(name)
        return 0
    options = read_pairs(args.options, "teacher option")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be a positive side in pixels, got {args.image_size}")
    levels = None
    if args.levels is not None:
        try:
            levels = [int(x) for x in args.levels.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--levels {args.levels!r}: comma-separated block indices, e.g. 2,5,8,11") from None
    spec = TeacherSpec(weights=args.weights, sha256=args.sha256, levels=levels, image_size=args.image_size)
    teacher = create_teacher(args.name, spec=spec, **options)
    if teacher.meta.weights == "random":  # as `sak select` says: shapes are right, features are not a teacher's
        print(f"sak teachers: note: {args.name} has no --weights: random weights (a hub tag or a local file gives "
              "the real ones)", file=sys.stderr)  # fmt: skip
    meta = teacher.meta.as_dict()
    meta["input_size"] = teacher.input_size
    meta["level_shapes"] = teacher.level_shapes()
    print(json.dumps(meta, indent=2, default=str))
    return 0


def _model(args) -> int:
    import torch

    from .engine.build import build_student, build_tasks, build_teachers
    from .student import parameter_report

    recipe = load_recipe(args.recipe, args.overrides)
    teachers = build_teachers(recipe, torch.device("cpu"))
    report = parameter_report(build_student(recipe, teachers, build_tasks(recipe)))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:>24}  {value:>14,d}  {value / 1e6:9.3f}M")
    return 0


def _export(args) -> int:
    from pathlib import Path

    from .engine.export import export_student

    recipe = load_recipe(args.recipe, args.overrides)
    source, what = (
        (Path(args.source), "sak export --from") if args.source else (recipe.run_dir, "sak export (the run directory)")
    )
    if not args.source and not recipe.run_dir.exists():  # (trained with run.output_dir / run.name overridden?)
        raise FileNotFoundError(
            f"sak export: no run at {str(recipe.run_dir)!r} (the recipe's run.output_dir / run.name); give the "
            "overrides it was trained with, the run's own recipe.yaml as RECIPE, or --from the run directory"
        )
    out = export_student(recipe, source, Path(args.out), what)
    print(f"exported the inference student to {out}/ (student.safetensors, student.yaml)")
    return 0


def _predict(args) -> int:
    from pathlib import Path

    from .engine.export import load_exported, predict_images, resolve_device

    device = resolve_device(args.device)  # (before the export is read)
    check_preds_folder(args.out, "--out")
    model, config = load_exported(Path(args.model))
    written = predict_images(model, config, [Path(p) for p in args.images], Path(args.out), device)
    print(f"wrote {len(written)} prediction file(s) under {Path(args.out)}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sak", description="Distil frozen vision foundation models into one student.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training_commands(sub)
    _add_inspecting_commands(sub)
    from .engine.cache.command import add_cache_command

    add_cache_command(sub)
    _add_inference_commands(sub)
    from .engine.viz import add_viz_command
    from .methods.select_command import add_select_command

    add_viz_command(sub)
    add_select_command(sub)
    return parser


def _add_training_commands(sub) -> None:
    """train, eval, eval-preds."""
    p = sub.add_parser(
        "train", help="train a recipe in this process (for N processes use `accelerate launch -m sak.train`)"
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", default=[], help="key.path=value")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "eval",
        help="score a checkpoint on a dataset split (PASCAL-Context / NYUD metrics); "
        "N processes: `accelerate launch -m sak.cli eval ...`",
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", default=[], help="key.path=value (before or after the options)")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory, .safetensors or export")
    p.add_argument("--split", default=None, help="split to score (default: the recipe's eval.split, val)")
    p.add_argument("--out", default=None, help="result JSON (default: print it)")
    p.add_argument("--save-preds", default=None, help="also write the predictions here, one folder per task")
    p.add_argument("--reference", default=None, help="JSON {task: value} for delta_m (default: published single-task)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("eval-preds", help="score saved prediction files (<task>/<id>.png|.npy) against a dataset")
    p.add_argument(
        "--dataset", required=True, help="pascal_context, nyud, or a registered dataset (--import its module)"
    )
    p.add_argument("--root", required=True, help="the dataset folder")
    p.add_argument("--preds", required=True, help="folder with one sub-folder per task")
    p.add_argument("--split", default="val")
    p.add_argument("--tasks", default=None, help="comma-separated (default: every task folder found)")
    p.add_argument("--out", default=None, help="result JSON (default: print it)")
    p.add_argument("--reference", default=None, help="JSON {task: value} for delta_m (default: published single-task)")
    p.add_argument("--eval-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="the ground truth's padding canvas (default: the dataset's, 512 x 512 or 448 x 576); images "
                        "larger than it need a larger one. Scores do not depend on it: padding is cut before scoring")  # fmt: skip
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="a plug-in module to import first (a dataset of your own), as a recipe's imports: (repeatable)")  # fmt: skip
    p.set_defaults(func=_eval_preds)


def _add_inspecting_commands(sub) -> None:
    """recipe show / check, teachers list / show, model show."""
    p = sub.add_parser("recipe", help="print the resolved recipe (show) or validate it (check)")
    p.add_argument("action", choices=["show", "check"])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", default=[])
    p.set_defaults(func=_recipe)

    p = sub.add_parser("teachers", help="list registered teachers or show one's metadata")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?")
    p.add_argument("options", nargs="*", default=[], help="the teacher's options as key=value")
    p.add_argument("--weights", default=None)
    p.add_argument("--sha256", default=None, help="the weights file's digest, checked (as teachers[].sha256)")
    p.add_argument("--levels", default=None, help="comma-separated block indices (as teachers[].levels)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="a plug-in module to import first, as a recipe's imports: (repeatable)",
    )  # fmt: skip
    p.set_defaults(func=_teachers)

    p = sub.add_parser("model", help="parameter report of a recipe's student")
    p.add_argument("action", choices=["show"])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", default=[])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_model)


def _add_inference_commands(sub) -> None:
    """export, predict."""
    p = sub.add_parser("export", help="save a run's student for inference (no teachers, no aligners)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", default=[])
    p.add_argument("--from", dest="source", default=None, help="run directory, checkpoint, .safetensors or export")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_export)

    p = sub.add_parser("predict", help="run an exported student on image files; one folder per task")
    p.add_argument("model", help="an export directory (sak export)")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: cuda when there is one)")
    p.set_defaults(func=_predict)


ONE_PROCESS = {
    "eval-preds",
    "export",
    "predict",
    "recipe",
    "teachers",
    "model",
    "cache info",
    "viz",
}  # (command action)
"""What runs on one process: under `accelerate launch` with N processes the main process runs it, the others
do nothing (each would have done all of it, and two exports could have paired one's weights with the other's
student.yaml). `train`, `eval`, `cache build` and `select` share their work among the processes."""


def launch_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes) under `accelerate launch` (the launcher's RANK and
    WORLD_SIZE), read from the environment so that nothing is initialised; (0, 1) outside one."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def say_error(text: str, everywhere: bool = True) -> None:
    """Print an error line on stderr. With N processes the main process prints it as it is and the others
    prefix it with `[process K/N]`, so that an error one process met (an unreadable image of its shard) says
    whose it was; with `everywhere=False` (an error each process meets alike, such as a recipe's) only the
    main process prints it, once rather than N times."""
    rank, world = launch_rank()
    if rank == 0 or world == 1:
        print(text, file=sys.stderr)
    elif everywhere:
        print(f"[process {rank}/{world}] {text}", file=sys.stderr)


OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # key.path=value


def is_user_error(exc: Exception) -> bool:
    """What bad input raises (a missing file, a name or value that is not valid, a stale cache, a damaged
    weights file, a run stopped by non-finite losses): `main` prints it as one line naming the problem and
    exits with status 2. Anything else keeps its traceback; SAK_TRACEBACK=1 keeps it for these too."""
    from .engine.cache import CacheError
    from .engine.trainer import NonFiniteLossError
    from .teachers.weights import WeightsError

    return isinstance(exc, (ValueError, KeyError, OSError, CacheError, WeightsError, NonFiniteLossError))


# torch's words for an error a DataLoader worker raised, raised again in the training process with the worker's
# whole traceback as its message (torch.utils.data._utils.ExceptionWrapper)
WORKER_ERROR = re.compile(
    r"Caught \w+ in (DataLoader worker process \d+)\.\nOriginal Traceback \(most recent call last\):\n"
)
LAST_TRACEBACK = "Traceback (most recent call last):\n"


def worker_message(message: str) -> str:
    """A loader worker's error as what it said, and which worker: the last exception of the worker's traceback
    (a DataError raised from PIL's, say) without the frames and its module path; any other message as it is."""
    found = WORKER_ERROR.match(message)
    if found is None:
        return message
    lines = message[found.end() :].rpartition(LAST_TRACEBACK)[2].splitlines()
    start = next((i for i, line in enumerate(lines) if line and not line[0].isspace()), None)
    if start is None:
        return message
    said = "\n".join(lines[start:]).partition(": ")[2]  # (after "package.module.Type")
    return f"{said} (in {found[1]})" if said else message


def print_user_error(exc: Exception, command: str) -> bool:
    """Print bad input (`is_user_error`) as one line, `sak COMMAND: Type: message`, and say so; False (print
    nothing) for anything else, or for everything with SAK_TRACEBACK set: the caller re-raises it."""
    if not is_user_error(exc) or os.environ.get("SAK_TRACEBACK"):
        return False
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # (KeyError quotes its text)
    say_error(f"sak {command}: {type(exc).__name__}: {worker_message(str(message))}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides (or a teacher's options) after the options (`sak eval R --checkpoint C k=v`) come back unparsed
    pairs = next((name for name in ("overrides", "options") if isinstance(getattr(args, name, None), list)), None)
    if extra and pairs is not None and all(OVERRIDE.match(x) for x in extra):
        getattr(args, pairs).extend(extra)
    elif extra and args.command == "predict" and not any(x.startswith("-") for x in extra):
        args.images.extend(extra)  # (image files after --out: `sak predict EXPORT a.jpg --out preds/ b.jpg`)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "action", None) == "show" and args.command == "teachers" and not args.name:
        print("sak teachers show: give a teacher name (see `sak teachers list`)", file=sys.stderr)
        return 2
    rank, world = launch_rank()
    if world > 1 and {args.command, f"{args.command} {getattr(args, 'action', '')}"} & ONE_PROCESS:
        if rank != 0:
            return 0
        print(f"sak {args.command}: runs on one process; the other {world - 1} of this launch do nothing",
              file=sys.stderr)  # fmt: skip
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return status
    except RecipeError as exc:  # every process reads the same recipe: said once
        say_error(f"sak: {exc}", everywhere=False)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (what was written whole stays)
        from .train import AGAIN

        what = AGAIN.get(f"{args.command} {getattr(args, 'action', '') or ''}".strip(), "")
        say_error(f"sak {args.command}: interrupted{what}", everywhere=False)
        return 130  # 128 + SIGINT, as the shell reports a command Ctrl-C stopped
    except BrokenPipeError:  # `sak recipe show R | head`: the reader has gone; say nothing, as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's flush at exit would fail too)
        return 141  # 128 + SIGPIPE: what the shell reports for a command killed by the closed pipe
    except Exception as exc:
        if not print_user_error(exc, args.command):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
