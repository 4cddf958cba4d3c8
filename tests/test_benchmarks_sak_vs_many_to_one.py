"""benchmarks/sak_vs_many_to_one.py: both architectures per seed, plain and spatial cosines, their differences."""

import json

from benchmarks.sak_vs_many_to_one import main
from tests.conftest import TINY


def test_each_seed_trains_both_architectures_and_the_table_compares_them(tmp_path):
    argv = ["--recipe", str(TINY), "--steps", "2", "--seeds", "0", "1", "--results", str(tmp_path)]
    assert main([*argv, "data.options.length=8"]) == 0
    r = json.loads((tmp_path / "sak_vs_many_to_one.json").read_text())
    for arch in ("sak", "many_to_one"):
        assert [run["seed"] for run in r[arch]] == [0, 1]
        for run in r[arch]:
            assert set(run["cosine"]) == set(run["spatial_cosine"]) == {"vit_a", "vit_b"}
    assert r["sak"][0]["params"]["total"] != r["many_to_one"][0]["params"]["total"]
    assert r["sak"][0]["cosine"] != r["sak"][1]["cosine"]  # another seed, another run
    md = (tmp_path / "sak_vs_many_to_one.md").read_text()
    a, b = r["sak"][1]["spatial_cosine"]["vit_a"], r["many_to_one"][1]["spatial_cosine"]["vit_a"]
    assert "| spatial_cosine | vit_a | vit_b | mean |" in md and f"| sak - many_to_one, seed 1 | {a - b:+.3f} |" in md
