"""Benchmarks run from any folder and write where --results says: a trial run from elsewhere read the default
recipes relative to the current folder (RecipeError) or overwrote the committed measurements."""

import benchmarks.optimizer_step
from benchmarks.profile_gpu import in_repo

from .conftest import REPO


def test_a_benchmark_run_from_another_folder_finds_its_recipe_and_writes_to_results(tmp_path, monkeypatch):
    committed = {p.name: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").glob("optimizer_step_*")}
    monkeypatch.chdir(tmp_path)
    args = ["--steps", "1", "--recipe", "recipes/bench/stage2_cpu.yaml", "--results", str(tmp_path / "res")]
    assert benchmarks.optimizer_step.main(args) == 0
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["optimizer_step_cpu.json", "optimizer_step_cpu.md"]
    assert {
        p.name: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").glob("optimizer_step_*")
    } == committed
    assert in_repo("recipes/bench/stage1_gpu_vitb.yaml") == REPO / "recipes/bench/stage1_gpu_vitb.yaml"
    (tmp_path / "mine.yaml").write_text("{}")
    assert str(in_repo("mine.yaml")) == "mine.yaml"  # a path that exists here is taken as given
