"""Reading a recipe file: YAML merge keys, repeated keys, numbers YAML 1.1 reads as strings, empty keys,
`~` in paths, and a written recipe reading back as it was."""

import re
from pathlib import Path

import pytest
import yaml

from sak.config import RecipeError, StrictLoader, load_recipe

from .conftest import TINY


def test_a_yaml_key_that_is_a_list_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("? [a, b]\n: 1\n")
    with pytest.raises(RecipeError, match="found a list as a key"):
        load_recipe(path)


def test_a_list_or_mapping_key_left_empty_is_empty(tmp_path):
    """`imports:` or `tasks:` with nothing after them read as null, which a list key refused."""
    path = tmp_path / "empty.yaml"
    path.write_text(TINY.read_text() + "imports:\ntasks:\n")
    recipe = load_recipe(path, ["data.options=null"])
    assert recipe.imports == [] and recipe.tasks == [] and recipe.data.options == {}


def test_a_merged_mapping_that_merges_another_can_be_merged_again():
    """A nested anchor that itself merges was refused as a repeated key when merged at a shallower level: the
    first merge had rewritten its keys in place."""
    doc = "base: &b {name: timm, key: p}\nx: {inner: &a {<<: *b, key: q}}\ny: {<<: *a, key: r}\n"
    data = yaml.load(doc, Loader=StrictLoader)
    assert data["x"]["inner"] == {"name": "timm", "key": "q"} and data["y"] == {"name": "timm", "key": "r"}


def test_a_key_given_twice_in_a_recipe_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(TINY.read_text() + "optim: {lr: 1.0}\n")
    with pytest.raises(RecipeError, match="found the key 'optim' twice"):
        load_recipe(path)


def test_yaml_merge_keys_fill_a_section_and_its_own_keys_win(tmp_path):
    """`<<: *anchor` (a second teacher written as the first with another key) is YAML's merge, not a key
    given twice; a key given twice beside it still is an error."""
    text = TINY.read_text()
    first = "  - name: timm\n    key: vit_a\n"
    second = text[text.index("  - name: timm\n    key: vit_b\n") : text.index("student:")]
    text = text.replace(first, "  - &first\n    name: timm\n    key: vit_a\n").replace(
        second, "  - {<<: *first, key: vit_b}\n"
    )
    path = tmp_path / "merged.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    assert [(t.name, t.key) for t in recipe.teachers] == [("timm", "vit_a"), ("timm", "vit_b")]
    assert recipe.teachers[1].options == recipe.teachers[0].options
    assert recipe.teachers[1].options["model"] == "vit_small_patch14_dinov2"
    path.write_text(text.replace("{<<: *first, key: vit_b}", "{<<: *first, key: vit_b, key: again}"))
    with pytest.raises(RecipeError, match="found the key 'key' twice"):
        load_recipe(path)
    # the merged teacher's options are its own: an override of one leaves the other (they shared one dict)
    path.write_text(text)
    changed = load_recipe(path, ["teachers.1.options.model_kwargs.embed_dim=64"])
    assert [t.options["model_kwargs"]["embed_dim"] for t in changed.teachers] == [48, 64]


def test_exponent_floats_are_numbers_in_untyped_mappings_too(tmp_path):
    """YAML 1.1 reads 1e-1 as a string; typed fields converted it, but model_kwargs are passed on as written and
    a string drop_path_rate failed inside timm. Integers and hex stay integers."""
    recipe = load_recipe(TINY, ["student.model_kwargs={embed_dim: 32, depth: 4, num_heads: 2, drop_path_rate: 1e-1}"])
    assert recipe.student.model_kwargs["drop_path_rate"] == 0.1
    path = tmp_path / "numbers.yaml"
    path.write_text(TINY.read_text().replace("lr: 1.0e-3", "lr: 1e-3") + "\nimports: []\n")
    assert load_recipe(path).optim.lr == 1e-3
    values = yaml.load("[1e-3, 2E5, .5e1, 10, 0x10, 1_000, e5, 1e]", Loader=StrictLoader)
    assert values == [1e-3, 2e5, 5.0, 10, 16, 1000, "e5", "1e"] and [type(v) for v in values[3:6]] == [int] * 3


def test_numbers_yaml_12_reads_are_numbers_and_underscore_runs_are_strings_not_a_crash(tmp_path):
    """`-.5` stayed a string in free-form mappings (model_kwargs reached timm as '-.5'); `._e5` and `0x_`, digit
    runs of underscores only, matched the number patterns and crashed the reader with a bare ValueError."""
    values = yaml.load("[-.5, +.5, .5, -.5e-1, ._e5, 0x_, 0o_, 0x1_f, 1_0.5]", Loader=StrictLoader)
    assert values == [-0.5, 0.5, 0.5, -0.05, "._e5", "0x_", "0o_", 31, 10.5]
    recipe = load_recipe(TINY, ["student.model_kwargs={embed_dim: 32, depth: 4, num_heads: 2, init_values: -.5}"])
    assert recipe.student.model_kwargs["init_values"] == -0.5
    with pytest.raises(RecipeError, match="optim.lr"):
        load_recipe(TINY, ["optim.lr=._e5"])
    path = tmp_path / "hex.yaml"
    path.write_text(TINY.read_text().replace("max_steps: 8", "max_steps: 0x_"))
    with pytest.raises(RecipeError, match=r"schedule.max_steps"):
        load_recipe(path)
    again = tmp_path / "again.yaml"  # written quoted where the loader reads a number, read back as the strings
    for name in ("0x_", "-.5", "+.5"):
        again.write_text(load_recipe(TINY, [f'run.name="{name}"']).to_yaml())
        assert load_recipe(again).run.name == name


def test_an_override_fills_a_section_left_empty_in_the_file(tmp_path):
    path = tmp_path / "empty_section.yaml"
    path.write_text(TINY.read_text() + "cache:\n")
    assert load_recipe(path, ["cache.path=/x"]).cache.path == "/x"


def test_a_written_recipe_reads_back_as_it_was_with_number_like_strings(tmp_path):
    """The loader reads 1e5 as a number: a run named '1e5' is written quoted (recipe.yaml, export, resume)."""
    recipe = load_recipe(TINY, ['run.name="1e5"', "optim.lr=1e-4"])
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    assert "name: '1e5'" in path.read_text()
    again = load_recipe(path)
    assert again == recipe and again.run.name == "1e5" and again.optim.lr == 1e-4


def test_home_in_the_recipes_paths_is_expanded(tmp_path):
    """run.output_dir=~/runs made a folder named `~` in the current directory."""
    recipe = load_recipe(
        TINY, ["run.output_dir=~/runs", "data.root=~/data", "checkpoint.init_from=~/runs/a", "data.subset=~/ids.txt"]
    )
    home = str(Path.home())
    assert recipe.run_dir == Path(home) / "runs" / "tiny"
    assert recipe.data.root == f"{home}/data" and recipe.checkpoint.init_from == f"{home}/runs/a"
    assert recipe.data.subset == f"{home}/ids.txt"  # (it was read as ./~/ids.txt: "cannot read the manifest")


def test_a_name_sak_reads_as_an_integer_round_trips_through_recipe_yaml(tmp_path):
    """The loader reads `0o17` as octal 15 (YAML 1.2); the writer, on YAML 1.1's rules, left it unquoted, and a
    run named so could not load its own recipe.yaml."""
    recipe = load_recipe(TINY, ["run.name='0o17'"])
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    assert load_recipe(tmp_path / "r.yaml").run.name == "0o17"


def test_home_is_refused_where_an_older_sak_made_a_folder_named_tilde(tmp_path, monkeypatch):
    """Before `~` was expanded, run.output_dir=~/runs wrote into ./~/runs: resuming there would start afresh
    in the home folder without a word."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~" / "runs").mkdir(parents=True)
    with pytest.raises(RecipeError, match=r"run.output_dir: '~/runs' is the home folder's .* but a folder .*~' exists"):
        load_recipe(TINY, ["run.output_dir=~/runs"])


def test_an_override_reaches_a_key_with_dots_in_a_mapping():
    """peft's LoraConfig.rank_pattern / alpha_pattern are keyed by module names with dots: an override of one
    was split at every dot, and refused as a list that is not there."""
    from sak.config import apply_override

    data = {"student": {"lora": {"r": 8, "rank_pattern": {"blocks.0.attn.qkv": 4}}}}
    apply_override(data, "student.lora.rank_pattern.blocks.0.attn.qkv=16")
    apply_override(data, "student.lora.r=4")
    assert data["student"]["lora"] == {"r": 4, "rank_pattern": {"blocks.0.attn.qkv": 16}}
    with pytest.raises(RecipeError, match=r"student.lora.rank_pattern.blocks is not in the recipe; give the whole list, "
                       r"e.g. 'student.lora.rank_pattern.blocks=\[...\]'; or, for a key with dots, the whole mapping, "
                       r"e.g. 'student.lora.rank_pattern=\{blocks.1.attn.qkv: ...\}'"):  # fmt: skip
        apply_override(data, "student.lora.rank_pattern.blocks.1.attn.qkv=16")  # a new one: the mapping is given whole
    with pytest.raises(
        RecipeError, match=r"tasks is not in the recipe; give the whole list, e.g. 'tasks=\[\{name: ...\}\]'$"
    ):
        apply_override(data, "tasks.0.name=semseg")  # (a recipe list: no mapping to suggest)


def test_a_recipe_that_is_not_utf8_text_is_an_error_naming_the_file(tmp_path):
    """UnicodeDecodeError came through, naming no file (a binary file, or a recipe saved as UTF-16)."""
    (tmp_path / "r.yaml").write_bytes(b"\xff\xferun: {}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: not UTF-8 text \(invalid start byte at byte 0\)"):
        load_recipe(tmp_path / "r.yaml")


def test_dates_are_strings_and_tagged_sets_or_bytes_are_refused_by_name(tmp_path):
    """YAML 1.1 read `2024-01-01` as a date (a run named by its date was refused as 'expected a string'); a date,
    a !!set or !!binary in model_kwargs passed the check and broke the run records' JSON when training started."""
    recipe = load_recipe(TINY, ["run.name=2024-01-01", "student.model_kwargs.note=2024-01-01"])
    assert recipe.run.name == "2024-01-01" and recipe.student.model_kwargs["note"] == "2024-01-01"
    path = tmp_path / "again.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe
    for value, kind in (("!!set {a: null}", "set"), ("!!binary aGk=", "bytes"), ("!!timestamp 2024-01-01", "date")):
        with pytest.raises(RecipeError, match=rf"student.model_kwargs.x: .* is a {kind}; a recipe holds strings"):
            load_recipe(TINY, [f"student.model_kwargs={{embed_dim: 32, depth: 4, num_heads: 2, x: {value}}}"])


def test_an_integer_past_pythons_digit_limit_in_a_recipe_names_the_file(tmp_path):
    """PyYAML's int() raised a ValueError (4300 digits) that left the recipe as a traceback naming no file."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.read_text() + "\nextra: " + "9" * 5000 + "\n")
    with pytest.raises(RecipeError, match=rf"{recipe}: a value YAML cannot read: Exceeds the limit"):
        load_recipe(recipe)


def test_a_choice_yaml_read_as_a_boolean_says_so():
    """`logging.wandb.mode=off` read as false: "False is not one of 'online', 'offline', 'disabled'" gave no clue;
    then "quote it", though a quoted 'off' is no choice either (it is 'disabled'). A huge integer where a number
    belongs was an OverflowError traceback naming no key."""
    with pytest.raises(RecipeError, match=r"wandb.mode: False is not one of .* \(YAML reads a bare yes / no / on / off"
                       r" as true / false; none of them is a choice here\)"):  # fmt: skip
        load_recipe(TINY, ["logging.wandb.mode=off"])
    with pytest.raises(RecipeError, match=r"optim.lr: 400-digit integer, too large for a number"):
        load_recipe(TINY, ["optim.lr=" + "9" * 400])
    with pytest.raises(RecipeError, match=r"override 'optim.lr=999.*a value YAML cannot read \(Exceeds the limit"):
        load_recipe(TINY, ["optim.lr=" + "9" * 5000])
    with pytest.raises(RecipeError, match=r"'fast' is not one of [^;]*$"):  # (a string: no quoting hint)
        load_recipe(TINY, ["logging.wandb.mode=fast"])


@pytest.mark.parametrize("split", ["", " ", ".", "train/..", "/data/val", "a//b"])
def test_a_split_that_names_no_split_is_refused(split):
    """An image folder's split is joined to data.root: an empty split (a shell variable left unset) or "." read
    the whole root and trained on the validation images too."""
    for key in ("data.split", "eval.split"):
        with pytest.raises(RecipeError, match=rf"{key}: '{re.escape(split)}' names no split"):
            load_recipe(TINY, [f"{key}='{split}'"])
    assert load_recipe(TINY, ["data.split=imagenet/train"]).data.split == "imagenet/train"


def test_a_comment_mark_in_an_override_value_is_refused():
    """`run.name='exp #3'` read as 'exp' (YAML's comment), so a resume could continue another run."""
    with pytest.raises(RecipeError, match=r"override 'run.name=exp #3': YAML reads ' #' as the start of a comment, "
                       r"so the value became 'exp'; quote the value"):  # fmt: skip
        load_recipe(TINY, ["run.name=exp #3"])
    assert load_recipe(TINY, ['run.name="exp #3"']).run.name == "exp #3"
    assert load_recipe(TINY, ["run.name=exp#3"]).run.name == "exp#3"  # (no space: no comment)
