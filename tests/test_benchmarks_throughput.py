"""The throughput table's cache columns: speed-up from wall clock, and its share of the two bounds."""

from pathlib import Path

import pytest
import torch

from benchmarks.throughput import table


def test_cache_row_reports_flop_and_step_bounds():
    online = {"case": "stage1/sak/online", "step_s": 0.4, "images_per_s": 20.0, "wall_images_per_s": 19.0,
              "peak_rss_gib": 1.0, "teacher_flops": 9.0, "student_flops": 1.0}  # fmt: skip
    cached = {**online, "case": "stage1/sak/fp16-cache", "step_s": 0.1, "images_per_s": 80.0,
              "wall_images_per_s": 57.0}  # fmt: skip
    md = table([online, cached], "CPU", "cmd")
    row = next(line for line in md.splitlines() if line.startswith("| stage1/sak/fp16-cache"))
    # 57 / 19 = 3x; FLOP bound (9 + 1) / 1 = 10x, 30% of it; step bound 0.4 / 0.1 = 4x, 75% of it
    assert row.endswith("| 3.00x | 10.00x (30%) | 4.00x (75%) |"), row
    online_row = next(line for line in md.splitlines() if line.startswith("| stage1/sak/online"))
    assert online_row.endswith("| - | - | - |")


def test_a_prefetching_cache_row_is_compared_with_the_online_row_of_its_configuration():
    online = {"case": "gpu/stage1/sak/online/compiled", "step_s": 0.4, "images_per_s": 20.0,
              "wall_images_per_s": 19.0, "peak_rss_gib": 1.0, "teacher_flops": 9.0, "student_flops": 1.0}  # fmt: skip
    cached = {**online, "case": "gpu/stage1/sak/fp16-cache/compiled/prefetch", "step_s": 0.1, "wall_images_per_s": 38.0}
    md = table([online, cached], "GPU", "cmd")
    row = next(line for line in md.splitlines() if line.startswith("| gpu/stage1/sak/fp16-cache/compiled/prefetch"))
    # alone, it has no step bound: its own step time includes the wait for the batch's copy (the table gave 99%)
    assert "| 2.00x | 10.00x (20%) | - (no row without read-ahead) |" in row, row
    # beside the cached row without read-ahead, the step bound is that row's: a read-ahead step time includes
    # the wait for the batch's copy, which made the bound about what the row reached (99% on the H200)
    plain = {**cached, "case": "gpu/stage1/sak/fp16-cache/compiled", "step_s": 0.05, "wall_images_per_s": 19.0}
    md = table([online, plain, cached], "GPU", "cmd")
    row = next(line for line in md.splitlines() if line.startswith("| gpu/stage1/sak/fp16-cache/compiled/prefetch"))
    assert "| 2.00x | 10.00x (20%) | 8.00x (25%) |" in row, row


def test_the_int8_cache_size_is_reported_as_a_share_of_float32():
    """The issue's target (int8 at most 30% of float32 per image) was only in the JSON, never in a table."""
    fp16 = {"case": "stage1/sak/fp16-cache", "step_s": 0.1, "images_per_s": 8.0, "peak_rss_gib": 1.0,
            "cache_mib_per_image": 2.0}  # fmt: skip
    int8 = {**fp16, "case": "stage1/sak/int8-cache", "cache_mib_per_image": 1.1}
    md = table([fp16, int8], "CPU", "cmd", "2.0")
    assert md.startswith("# Training-step throughput (CPU, torch 2.0)")  # the results' torch, not this one's
    assert "stage1/sak/int8-cache: 1.100 MiB an image on disk, 27.5% of float32 (4.000 MiB: twice" in md


def test_a_wall_rate_that_may_be_the_loaders_queue_is_marked():
    """With 16 batches queued by 8 workers during the warm-up and 15 timed steps, every timed step could take a
    queued batch: the cached GPU rows' wall rate was the step's, not the loader's."""
    row = {"case": "gpu/stage1/sak/fp16-cache", "step_s": 0.1, "images_per_s": 80.0, "wall_images_per_s": 79.0,
           "peak_rss_gib": 1.0, "peak_gpu_gib": 1.0, "global_batch": 8, "wall_prefilled": 16}  # fmt: skip
    md = table([row], "GPU", "cmd")
    assert "| 79.0 (q) |" in md and "(q): wall images/s of steps that may all have taken batches" in md
    assert "gpu/stage1/sak/fp16-cache (16 batches)" in md
    assert "(q)" not in table([{**row, "wall_prefilled": None}], "GPU", "cmd")


def test_a_run_replaces_the_committed_results_only_when_every_case_has_run(tmp_path, monkeypatch):
    """Each case's row was written over the committed tables at once: an interrupted `make bench` left them cut
    to the cases it had reached. The CPU suite's cases now also run on the CPU where a GPU is present."""
    import json
    import subprocess

    import benchmarks.throughput as throughput

    (tmp_path / "throughput_cpu.md").write_text("committed")
    seen = []

    def case(cmd, env=None, **kwargs):
        seen.append(env["CUDA_VISIBLE_DEVICES"])
        if len(seen) == 2:  # a kill in the second case
            assert (tmp_path / "throughput_cpu.md").read_text() == "committed"
            assert "stage1/bare/online" in (tmp_path / "throughput_cpu.partial.md").read_text()
            raise KeyboardInterrupt
        row = {"case": cmd[cmd.index("--case") + 1], "step_s": 0.1, "images_per_s": 1.0, "peak_rss_gib": 1.0}
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps(row))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(throughput.subprocess, "run", case)
    only = ["--only", "stage1/bare/online", "stage1/sak/online", "--repeats", "1", "--results", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        throughput.main(only)
    assert (tmp_path / "throughput_cpu.md").read_text() == "committed" and seen == ["", ""]
    seen.append("past the kill")
    assert throughput.main(only) == 0
    assert "stage1/sak/online" in (tmp_path / "throughput_cpu.md").read_text()
    assert not list(tmp_path.glob("*.partial.*"))


@pytest.mark.parametrize(
    "args, error",
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--warmup", "-1"], "--warmup 0 or more"),
        (["--case", "stage1/sak/online"], "--case runs one case in this process and writes its row to --out FILE"),
    ],
)
def test_arguments_that_would_measure_nothing_are_an_error(args, error, tmp_path, monkeypatch, capsys):
    import benchmarks.throughput as throughput

    def no_case(cmd, **kwargs):  # (were the check gone, the suite would not run here)
        raise AssertionError("a case was started")

    monkeypatch.setattr(throughput.subprocess, "run", no_case)
    with pytest.raises(SystemExit):
        throughput.main([*args, "--results", str(tmp_path)])
    assert error in capsys.readouterr().err


def test_a_suite_whose_case_failed_every_time_exits_non_zero(tmp_path, monkeypatch, capsys):
    """A `make bench` whose cases all crashed reported success: the failures were only rows of the table."""
    import subprocess

    import benchmarks.throughput as throughput

    def crash(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nRuntimeError: out of memory")

    monkeypatch.setattr(throughput.subprocess, "run", crash)
    code = throughput.main(["--only", "stage1/sak/online", "--repeats", "1", "--results", str(tmp_path)])
    assert code == 1
    assert "every run of ['stage1/sak/online'] failed" in capsys.readouterr().err
    assert "RuntimeError: out of memory" in (tmp_path / "throughput_cpu.md").read_text()


def test_the_cache_loader_benchmark_refuses_runs_that_would_time_no_batch(tmp_path, monkeypatch, capsys):
    import benchmarks.cache_loader as cache_loader

    def no_cache(*args, **kwargs):  # (were the check gone, nothing would be written here)
        raise AssertionError("a cache was written")

    monkeypatch.setattr(cache_loader, "write_cache", no_cache)
    with pytest.raises(SystemExit):
        cache_loader.main(["--images", "16", "--batch", "16", "--results", str(tmp_path)])
    assert "--images must make at least 7 batches of --batch 16 an epoch with --workers 2" in capsys.readouterr().err
    # 8 batches with 8 workers: all 16 in flight when the first arrives; timing them read the prefetched queue
    with pytest.raises(SystemExit):
        cache_loader.main(["--images", "128", "--workers", "8", "--results", str(tmp_path)])
    assert "at least 19 batches" in capsys.readouterr().err
    loader = torch.utils.data.DataLoader(range(8), num_workers=3)
    assert cache_loader.in_flight(loader) == 6 and cache_loader.in_flight(torch.utils.data.DataLoader(range(8))) == 0


def test_only_names_outside_the_suite_are_an_error(capsys):
    from benchmarks.throughput import main

    with pytest.raises(SystemExit):
        main(["--only", "stage1/sak/online", "gpu/stage1/sak/online"])
    assert "--only: ['gpu/stage1/sak/online'] are not cases of the cpu suite" in capsys.readouterr().err


def test_profile_counts_operations_per_phase_on_the_cpu():
    """benchmarks/profile_gpu.py --device cpu: host time and dispatched operations for every phase; casting
    the teachers' weights once leaves out autocast's per-step casts."""
    import torch

    from benchmarks.profile_gpu import profile_recipe
    from tests.conftest import TINY

    common = ["data.num_workers=0", "precision.mixed=bf16"]
    autocast = profile_recipe(str(TINY), 1, common, "", 0, torch.device("cpu"))
    cast = profile_recipe(str(TINY), 1, [*common, "precision.teacher_weights=cast"], "", 0, torch.device("cpu"))
    phases = [p["phase"] for p in autocast["phases"]]
    assert phases == ["teacher vit_a", "teacher vit_b", "student forward", "losses", "backward", "optimiser"]
    for p in autocast["phases"]:
        assert p["host_ms"] > 0 and p["aten_calls"] >= p["non_view_calls"] > 0, p
    by = {p["phase"]: p for p in cast["phases"]}
    for p in autocast["phases"]:
        if p["phase"].startswith("teacher"):
            assert by[p["phase"]]["non_view_calls"] < p["non_view_calls"]
        else:
            assert by[p["phase"]]["non_view_calls"] == p["non_view_calls"]


def test_peak_resident_tells_mapped_files_from_the_heap(tmp_path):
    """The throughput benchmark's memory columns: pages of a memory-mapped file count as file-backed,
    anonymous memory the process writes counts as anonymous."""
    import mmap
    import time

    from benchmarks.throughput import PeakResident, resident

    size = 96 * 2**20
    path = tmp_path / "shard.bin"
    path.write_bytes(b"\1" * size)
    before = resident()
    with PeakResident() as memory:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            checksum = sum(mapped[i] for i in range(0, size, 4096))  # touch every page
            time.sleep(0.1)
        private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # fresh pages: malloc could reuse freed memory
        with mmap.mmap(-1, size, flags=private) as anonymous:
            for i in range(0, size, 4096):
                anonymous[i] = 2  # write every page
            written = sum(anonymous[i] for i in range(0, size, 4096))
            time.sleep(0.1)
    assert checksum == size // 4096 and written == 2 * (size // 4096)
    peak = memory.gib()
    assert peak["peak_rss_file_gib"] - before["RssFile"] / 2**20 > 0.8 * size / 2**30
    assert peak["peak_rss_anon_gib"] - before["RssAnon"] / 2**20 > 0.8 * size / 2**30


def test_cache_loader_benchmark_reads_a_gpu_sized_cache_through_the_training_loader(tmp_path):
    """benchmarks/cache_loader.py writes a cache in the real format with the GPU recipe's level shapes
    (31.6 MiB per image in fp16, as measured on the H100) and times the training loader over it."""
    from benchmarks.cache_loader import breakdown, measure, write_cache
    from sak.engine.cache import FeatureCache

    root = write_cache(tmp_path / "c", samples=4, dtype="fp16", shard_size=3)
    cache = FeatureCache(root)
    cache.verify_all()
    rows = cache.rows(3, epoch=0)  # second shard
    assert sum(v.numel() * v.element_size() for v in rows.values()) / 2**20 == pytest.approx(31.6, abs=0.05)
    r = measure(root, images=4, batch=2, workers=0, epochs=1)
    assert r["epochs_timed"] == 1 and r["mib_per_batch"] == pytest.approx(63.2, abs=0.1) and r["images_per_s"] > 0
    assert r["images_per_s"] == pytest.approx(2 / r["batch_s"])
    parts = breakdown(root, images=4, batch=2)
    assert (
        set(parts) == {"images_s", "gather_s", "gather_2_s", "gather_reused_s", "before_s"} and min(parts.values()) > 0
    )


def test_traffic_counts_what_each_operation_reads_and_writes():
    """benchmarks/step_traffic.py's counter: a linear layer reads input, weight and bias and writes its output;
    copy_ into a slice reads only the source; an in-place add reads both and writes one; allocations and
    views move nothing; a broadcast matrix is read once; FLOPs are flop_counter's."""
    import torch

    from benchmarks.step_traffic import CountTraffic

    x, w, b, batch = torch.ones(4, 8), torch.ones(16, 8), torch.ones(16), torch.ones(3, 16, 5)
    with CountTraffic() as counter:
        y = torch.addmm(b, x, w.t())  # (4, 16)
        buf = torch.empty(4, 32)
        buf[:, :16].copy_(y)
        buf[:, 16:].add_(y)
        y.view(64).t()
        torch.matmul(w.t()[:4], batch)  # (4, 16) @ (3, 16, 5): a bmm of the expanded matrix
    f32 = 4
    assert counter.rows[("bmm", "float32")] == [1, (64 + 3 * 16 * 5 + 3 * 4 * 5) * f32, 2 * 3 * 4 * 16 * 5]
    assert counter.rows[("addmm", "float32")] == [1, (16 + 32 + 128 + 64) * f32, 2 * 4 * 8 * 16]
    assert counter.rows[("copy_", "float32")] == [1, (64 + 64) * f32, 0]
    assert counter.rows[("add_", "float32")] == [1, (64 + 64 + 64) * f32, 0]
    assert set(counter.rows) == {("addmm", "float32"), ("copy_", "float32"), ("add_", "float32"), ("bmm", "float32")}


def test_traffic_roofline_is_taken_per_call():
    """Two products of one row, one FLOP-bound and one memory-bound: the roofline adds each call's own
    max(FLOPs / peak, bytes / bandwidth) (1024 + 516), not the max of the row's sums (max(1152, 1412))."""
    import torch

    from benchmarks.step_traffic import CountTraffic

    with CountTraffic(peak=1.0, bandwidth=1.0) as counter:
        torch.mm(torch.ones(4, 8), torch.ones(8, 16))  # 1024 FLOPs, (32 + 128 + 64) * 4 = 896 bytes
        torch.mm(torch.ones(1, 1), torch.ones(1, 64))  # 128 FLOPs, (1 + 64 + 64) * 4 = 516 bytes
    assert counter.rows[("mm", "float32")] == [2, 896 + 516, 1024 + 128]
    assert counter.seconds[("mm", "float32")] == [1024 + 516, 1024]


def test_traffic_splits_forward_bytes_by_module_and_leaves_backward_out():
    import torch
    from torch.utils.module_tracker import ModuleTracker

    from benchmarks.step_traffic import CountTraffic, module_group

    assert module_group("SAKStudent.paths.sam.adapters.12.down") == "paths.sam.adapters.N.down"
    assert module_group("Global") == "Global"
    blocks = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16))
    x = torch.ones(4, 8)
    with ModuleTracker() as tracker:
        with CountTraffic(tracker) as forward:
            loss = (blocks(x) * 2).sum()
        with CountTraffic(tracker) as backward:
            loss.backward()
    f32 = 4
    # the blocks: two addmm and a gelu; "Global": the product and the sum outside them
    assert set(forward.modules) == {"N", "Global"}
    assert forward.modules["N"] == ((16 + 128 + 32 + 64) + 2 * 64 + (16 + 256 + 64 + 64)) * f32
    assert "N" not in backward.modules and sum(r[1] for r in backward.rows.values()) > forward.modules["N"]


def test_traffic_of_a_recipe_on_fake_tensors_matches_a_real_step():
    """traffic_recipe runs the step on fake tensors: the student's FLOPs equal flop_counter's on a real
    forward and backward (the tiny teachers' grids equal the student's: no resize in the losses), every phase
    is there, and a fused optimiser's in-place update is counted."""
    import torch

    from benchmarks.flops import flop_counter
    from benchmarks.step_traffic import markdown, traffic_recipe
    from sak.config import load_recipe
    from sak.engine.build import build_loader, build_student, build_teachers
    from tests.conftest import TINY

    result = traffic_recipe(str(TINY), ["data.num_workers=0"])
    phases = {p["phase"]: p for p in result["phases"]}
    assert list(phases) == ["teacher vit_a", "teacher vit_b", "student forward", "losses", "backward", "optimiser"]
    for p in phases.values():
        assert p["operations"] > 0 and p["gbytes"] > 0 and p["roofline_ms"] > 0, p

    recipe = load_recipe(str(TINY), ["data.num_workers=0"])
    torch.manual_seed(0)
    student = build_student(recipe, build_teachers(recipe, torch.device("cpu")), {}).train()
    images = next(iter(build_loader(recipe, recipe.data.split, train=True)))["image"]
    with flop_counter() as forward:
        out = student(images)
    loss = sum(level.float().square().mean() for levels in out.features.values() for level in levels)
    with flop_counter() as backward:
        loss.backward()
    assert phases["student forward"]["tflop"] * 1e12 == pytest.approx(forward.get_total_flops(), rel=1e-9)
    assert phases["backward"]["tflop"] * 1e12 == pytest.approx(backward.get_total_flops(), rel=1e-9)
    # the roofline's rates and the peak MFU is taken against, as given (the MFU line took 989 TFLOP/s always)
    md = markdown([result], 3, 1e12, 1e12, "cmd", dense_peak=2e12)
    assert "(as given by --peak and --bandwidth)" in md and "of the dense bf16 peak (2 TFLOP/s;" in md
    params = sum(p.numel() for p in student.parameters())
    # AdamW reads parameter, gradient and both moments and writes three of them back, in float32
    assert phases["optimiser"]["gbytes"] * 1e9 >= 7 * 4 * params


def test_forward_phases_run_on_fake_cuda_tensors_under_cuda_autocast():
    """Without a GPU, step_traffic still counts the forward phases as CUDA autocast runs them: the student's
    matrix products in bf16, attention in the fused CUDA kernel; same FLOPs as under CPU autocast."""
    from benchmarks.step_traffic import compare_forward, cuda_forward, traffic_recipe
    from tests.conftest import TINY

    overrides = ["data.num_workers=0", "precision.mixed=bf16"]
    phases = cuda_forward(str(TINY), overrides)
    assert list(phases) == ["teacher vit_a", "teacher vit_b", "student forward", "losses"]
    student = phases["student forward"]
    assert ("addmm", "bfloat16") in student and ("addmm", "float32") not in student
    assert ("_scaled_dot_product_flash_attention", "bfloat16") in student
    cpu = traffic_recipe(str(TINY), overrides)
    rows = {r["phase"]: r for r in compare_forward(cpu, phases)}
    assert set(rows) == set(phases)
    cpu_student = next(p for p in cpu["phases"] if p["phase"] == "student forward")
    assert sum(r[2] for r in student.values()) / 1e12 == pytest.approx(cpu_student["tflop"], rel=1e-9)


def test_cuda_forward_counts_sams_folded_attention_with_v_narrow_as_a_gpu_runs_it():
    """On CUDA the SAM teacher's folded attention passes v narrower than q and k, which the flash kernel
    refuses: the fake-CUDA count sends it to the memory-efficient kernel (the flash kernel's shapes broke the
    teacher's output projection)."""
    from benchmarks.step_traffic import cuda_forward
    from tests.conftest import TINY

    sam = ("teachers.1={name: sam, key: sam, options: {source: timm, model_kwargs: {img_size: 64, patch_size: 8, "
           "embed_dim: 32, depth: 4, num_heads: 2, window_size: 4, global_attn_indexes: [1, 3], neck_chans: 16}}}")  # fmt: skip
    phases = cuda_forward(str(TINY), ["data.num_workers=0", "precision.mixed=bf16", sam])
    attention = {op for op, _ in phases["teacher sam"] if "attention" in op}
    assert attention == {"_scaled_dot_product_efficient_attention"}


def test_flop_counter_counts_attention_on_the_cpu():
    """torch's flop_counter has no formula for the CPU attention kernel; benchmarks/flops.py gives it the GPU
    kernels' one: QK^T and PV, 2 * 2 * L * S * d per head, and 2.5 times that backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.flops import flop_counter

    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as plain:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert plain.get_total_flops() == 0  # what torch alone counts on a CPU (if it learns, this test says so)
    with flop_counter() as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    forward = 2 * 3 * 2 * 2 * 16 * 16 * 8
    assert counter.get_total_flops() == forward
    with flop_counter() as counter:
        out.sum().backward()
    assert counter.get_total_flops() == forward * 5 // 2


def test_every_case_is_a_valid_recipe():
    """A misspelt override in a GPU case would cost a device call to find out: every case's recipe and
    overrides load and validate here (teacher options included)."""
    from benchmarks.throughput import ALL_CASES
    from sak.config import load_recipe

    for name, (recipe, overrides, *_) in ALL_CASES.items():
        assert load_recipe(recipe, overrides).teachers, name


def test_model_flops_leave_grad_checkpointings_recomputation_out_and_peaks_match_the_exact_card():
    """The grad-checkpointing row's MFU counted the blocks' second forward (hardware FLOPs); an H100 PCIe or NVL
    was given the SXM card's peak by a substring match."""
    from benchmarks.throughput import flops, peak_bf16
    from sak.config import load_recipe
    from tests.conftest import TINY

    plain = flops(load_recipe(TINY, ["data.num_workers=0"]))
    checkpointed = flops(load_recipe(TINY, ["data.num_workers=0", "student.grad_checkpointing=true"]))
    assert checkpointed == plain
    names = ("H100 80GB HBM3", "H100 PCIe", "H100 NVL", "H200", "H200 NVL")
    assert [peak_bf16(f"NVIDIA {n}") for n in names] == [989e12, 756e12, 835e12, 989e12, 835e12]
    assert peak_bf16("NVIDIA GeForce RTX 4090") is None and peak_bf16(None) is None


def test_the_bare_loop_refuses_work_it_does_not_write_out():
    from benchmarks.throughput import bare_loop
    from sak.config import load_recipe
    from tests.conftest import TINY

    with pytest.raises(ValueError, match="optim.grad_accum > 1 are not written out"):
        bare_loop(load_recipe(TINY, ["optim.grad_accum=2"]), steps=1, warmup=0)


def test_the_bare_loop_times_each_step_and_its_wall_time_with_the_loading():
    """Each step's wall time runs from the end of the step before, so it holds the step's own time and the
    batch's loading; the table sets the two loops' wall times side by side (what the engine's logging costs)."""
    from benchmarks.throughput import bare_loop
    from sak.config import load_recipe
    from tests.conftest import TINY

    times, walls = bare_loop(load_recipe(TINY, ["data.num_workers=0"]), steps=3, warmup=1)
    assert len(times) == len(walls) == 3
    assert all(0 < t <= w for t, w in zip(times, walls, strict=True)), (times, walls)

    bare = {"case": "stage1/bare/online", "step_s": 0.4, "wall_s": 0.5, "images_per_s": 20.0, "peak_rss_gib": 1.0}
    sak = {**bare, "case": "stage1/sak/online", "step_s": 0.42, "wall_s": 0.55}
    md = table([bare, sak], "CPU", "cmd")
    assert "stage1: sak engine / bare loop wall time a step = 1.100 (the framework overhead: " in md
    assert md.rstrip().endswith("included); step time = 1.050"), md


def test_the_bare_loop_steps_the_recipes_schedule_once_a_step(monkeypatch):
    """The engine steps its learning-rate schedule after each optimiser step; the bare loop does the same work."""
    import benchmarks.throughput as throughput
    from sak.config import load_recipe
    from tests.conftest import TINY

    seen, engine_lambda = [], throughput.lr_lambda

    def recording(*args):
        multiplier = engine_lambda(*args)
        return lambda step: seen.append(step) or multiplier(step)

    monkeypatch.setattr(throughput, "lr_lambda", recording)
    throughput.bare_loop(load_recipe(TINY, ["data.num_workers=0", "schedule.max_steps=4"]), steps=3, warmup=1)
    assert sorted(set(seen)) == [0, 1, 2, 3, 4]  # at construction, then once a step (for each parameter group)


def test_the_profiled_and_counted_steps_normalize_the_targets_as_the_trainer_does():
    """With loss.normalize, profile_gpu's bare step (which step_traffic runs on fake tensors) adds the batch to
    the statistics and applies the map, once a step, between the teachers and the student; step_traffic leaves
    that phase out of the model FLOPs, as throughput.py does."""
    import torch

    from benchmarks.profile_gpu import BareStep, profile_recipe
    from benchmarks.step_traffic import traffic_recipe
    from sak.config import load_recipe
    from tests.conftest import TINY

    overrides = ["data.num_workers=0", "loss.normalize=phi_s"]  # its map is a matrix product: counted FLOPs
    profiled = profile_recipe(str(TINY), 1, overrides, "", 0, torch.device("cpu"))
    phases = [p["phase"] for p in profiled["phases"]]
    assert phases == ["teacher vit_a", "teacher vit_b", "normalize targets", "student forward", "losses",
                      "backward", "optimiser"]  # fmt: skip
    counted = traffic_recipe(str(TINY), overrides)
    plain = traffic_recipe(str(TINY), ["data.num_workers=0"])
    normalize = next(p for p in counted["phases"] if p["phase"] == "normalize targets")
    assert normalize["operations"] > 0 and normalize["tflop"] > 0
    assert counted["model_tflop"] == pytest.approx(plain["model_tflop"], rel=1e-9)

    bare = BareStep.build(load_recipe(str(TINY), overrides), torch.device("cpu"))
    for _ in range(2):
        bare.run(lambda name, fn: fn())
    assert bare.step == 2
    assert all(float(n.count) > 0 for levels in bare.normalizers.norms.values() for n in levels)


def test_the_table_shows_the_spatial_cosine_beside_the_plain_one():
    """The plain cosine of mean-dominated maps hides whether a cache kept the maps' structure."""
    row = {"case": "stage1/sak/fp16-cache", "step_s": 0.1, "images_per_s": 8.0, "peak_rss_gib": 1.0,
           "val_cosine": {"dinov2": 0.5661, "clip": 0.29}, "val_spatial_cosine": {"dinov2": 0.3572}}  # fmt: skip
    md = table([row], "CPU", "cmd")
    assert "| dinov2 0.566 / 0.357, clip 0.290 |" in md
    gpu = {**row, "peak_gpu_gib": 1.0, "global_batch": 8}
    assert "- stage1/sak/fp16-cache: dinov2 0.5661 / 0.3572, clip 0.2900" in table([gpu], "GPU", "cmd")
