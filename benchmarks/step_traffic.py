"""Memory traffic and FLOPs of one training step of the GPU recipes, per phase, counted on the CPU.

    python -m benchmarks.step_traffic [--recipe recipes/bench/stage1_gpu_vitb.yaml] [--rows 12] [overrides]

The step (each teacher's forward, the student's forward, the losses, backward, the optimiser; the same
modules and calls as benchmarks/profile_gpu.py) runs on fake tensors (torch's FakeTensorMode: shapes,
dtypes and strides are propagated, nothing is computed or allocated), so the GPU configuration's real
shapes (batch 16, SAM at 1024 px) cost seconds on a machine without a GPU. For every aten operation that
launches work (views, and calls that return their input, are left out) it counts:

- bytes: the sizes of the tensors the operation reads and writes, i.e. what one unfused kernel moves
  through memory at least (a kernel that reads its input twice, such as a softmax, moves more); a
  broadcast operand counts once;
- FLOPs: torch.utils.flop_counter's formulas (matrix products, convolutions, attention);
- in the forward phases, the bytes per module (torch.utils.module_tracker; the blocks of a stack added up),
  to find where the traffic is; backward operations are not split this way (the tracker cannot place them).

From the two, a roofline estimate of the GPU time: each call takes max(FLOPs / peak, bytes /
bandwidth), summed over the phase's calls; by default an H100's dense bf16 peak and HBM3 bandwidth, at the
shares of them that large kernels reach (--peak, --bandwidth). It is a lower bound for eager execution
(no launch gaps, no kernel below its roofline); a phase far above it on a GPU spends its time elsewhere
(launches, synchronisation, slow kernels), a phase near it can only get faster by moving fewer bytes
(fusion: torch.compile; fewer copies) or doing fewer FLOPs.

The step runs under CPU autocast in the recipe's precision, whose op lists differ from CUDA's in a few
places (both run matrix products, convolutions and attention in bf16 and keep layer norms and reductions in
float32). To show where, the forward phases are counted a second time on fake CUDA tensors under CUDA
autocast (`cuda_forward`; --no-cuda-forward skips it); backward cannot run that way without a real CUDA
context. In the GPU recipes the two agree to within about 1 GB per phase (stage 2's routers: CUDA autocast
keeps their LayerNorm and GELU in float32).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import re
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.module_tracker import ModuleTracker

from sak.config import Recipe, load_recipe
from sak.losses.resize import gram_matrix, interpolation_matrix
from sak.teachers.base import _per_channel

from .flops import CPU_ATTENTION
from .profile_gpu import VIEWS, BareStep, in_repo

RESULTS = Path(__file__).parent / "results"
DEFAULT_RECIPES = [
    "recipes/bench/stage1_gpu_vitb.yaml",
    "recipes/bench/stage1_gpu_vitb.yaml precision.teacher_weights=cast",
    "recipes/bench/stage2_gpu_vitb.yaml",
]
# H100 SXM: 989 TFLOP/s dense bf16 and 3.35 TB/s HBM3; large GEMMs reach ~70% and streaming kernels ~90%
DENSE_PEAK = 989e12
PEAK, BANDWIDTH = 0.7 * DENSE_PEAK, 0.9 * 3.35e12


def operation_flops(func, args, kwargs, out) -> int:
    """FLOPs of one aten call: flop_counter's formula where it has one (and benchmarks/flops.py's for the
    CPU attention kernel, which fake tensors of a CPU run dispatch to)."""
    if func.overloadpacket in CPU_ATTENTION:
        shapes = [a.shape if isinstance(a, torch.Tensor) else a for a in args]
        return CPU_ATTENTION[func.overloadpacket](*shapes)
    if func.overloadpacket in flop_registry:
        return int(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
    return 0


# calls that only allocate memory: nothing is read or written
ALLOCATIONS = {"empty", "new_empty", "empty_like", "empty_strided", "new_empty_strided"}


# in-place calls that overwrite their destination without reading it
OVERWRITES = {"copy_", "zero_", "fill_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_"}


def written_arguments(func, args, kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors an aten call writes in place (the arguments its schema marks Tensor(a!)), and those of
    them it does not read first (`out=` arguments, the destination of copy_ / fill_ / zero_)."""
    written, unread = [], []
    overwrites = func.overloadpacket.__name__ in OVERWRITES
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
        written += tensors
        if overwrites or arg.kwarg_only:  # out= is keyword-only
            unread += tensors
    return written, unread


def distinct_bytes(t: torch.Tensor) -> int:
    """The bytes of a tensor's distinct elements: a broadcast (expanded, stride-0) dimension is read once,
    as a kernel does through its cache (e.g. the one matrix of a batched product with a broadcast operand)."""
    return t.element_size() * math.prod(n for n, stride in zip(t.shape, t.stride(), strict=True) if stride != 0)


def module_group(name: str) -> str:
    """A ModuleTracker name with the root class and list indices left out: "SAKStudent.paths.sam.adapters.3.down"
    -> "paths.sam.adapters.N.down", so that the blocks of a stack add up."""
    name = re.sub(r"\.\d+(?=\.|$)", ".N", name)
    return name.partition(".")[2] or name


class CountTraffic(TorchDispatchMode):
    """Per (operation, output dtype): calls, bytes read + written, FLOPs, while active (`rows`), and the
    roofline seconds of those calls (`seconds`: the sum over calls of max(FLOPs / peak, bytes / bandwidth),
    and of it the calls where the FLOP term is the larger). Taken per call, not per row: a row's totals can
    be memory-bound while some of its calls (large products among small ones) are FLOP-bound, and
    max(sum, sum) <= sum(max). Given a ModuleTracker (entered), also the forward bytes per module
    (`module_group` of the innermost module running); backward operations are left out of that split, since
    the tracker cannot place them reliably."""

    def __init__(self, tracker: ModuleTracker | None = None, peak: float = PEAK, bandwidth: float = BANDWIDTH) -> None:
        super().__init__()
        self.rows: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        self.seconds: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        self.peak, self.bandwidth = peak, bandwidth
        self.tracker = tracker
        self.modules: dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        known = func.overloadpacket in flop_registry or func.overloadpacket in CPU_ATTENTION
        if not known and func is not torch.ops.prim.device.default:
            # a composite call (linear, einsum, attention: under inference_mode they reach the dispatcher
            # whole) is counted as the calls it is made of, as flop_counter does
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in VIEWS or name in ALLOCATIONS:
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        mutated, unread = written_arguments(func, args, kwargs)  # in-place, out=, foreach/fused optimisers
        if not outputs and not mutated:  # queries (sizes, devices), nothing moved
            return out
        if not mutated and all(any(torch._C._is_alias_of(o, i) for i in inputs) for o in outputs):
            return out  # returned its input or a view of it (e.g. dropout in eval, a no-op `to`)
        read = [t for t in inputs if not any(t is u for u in unread)]
        fresh = [o for o in outputs if not any(torch._C._is_alias_of(o, i) for i in inputs)]
        moved = sum(distinct_bytes(t) for t in read + fresh + mutated)
        first = (outputs or mutated)[0]
        dtype = str(first.dtype).removeprefix("torch.")
        flops = operation_flops(func, args, kwargs, out)
        row = self.rows[(name, dtype)]
        row[0] += 1
        row[1] += moved
        row[2] += flops
        compute, memory = flops / self.peak, moved / self.bandwidth
        seconds = self.seconds[(name, dtype)]
        seconds[0] += max(compute, memory)
        seconds[1] += compute if compute > memory else 0.0
        if self.tracker is not None and not self.tracker.is_bw:
            self.modules[module_group(max(self.tracker.parents, key=len))] += moved  # nested names are longer
        return out


CACHES = (interpolation_matrix, gram_matrix, _per_channel)  # cached constants: made fake by a run, only for it


def load_one_batch(path: str, overrides: list[str]) -> Recipe:
    """The recipe, a generated dataset cut to the one batch the step uses."""
    path = in_repo(path)
    recipe = load_recipe(path, overrides)
    if recipe.data.name == "synthetic":  # generate only one batch's images
        recipe = load_recipe(path, [f"data.options.length={recipe.data.batch_size}", "data.num_workers=0", *overrides])
    return recipe


def fake_bare_step(recipe: Recipe, device: str = "cpu") -> tuple[BareStep, FakeTensorMode]:
    """The recipe's bare step built on the CPU, its modules' tensors and its batch made fake on `device`."""
    bare = BareStep.build(recipe, torch.device("cpu"))
    fake = FakeTensorMode()

    def to_fake(t: torch.Tensor) -> torch.Tensor:
        with fake:
            return fake.from_tensor(t).to(device)

    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # parameters become fake Parameters
    try:
        for module in [*bare.teachers.values(), bare.student, *([bare.normalizers] if bare.normalizers else [])]:
            module._apply(to_fake)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    bare.batch = {k: to_fake(v) if isinstance(v, torch.Tensor) else v for k, v in bare.batch.items()}
    for cached in CACHES:
        cached.cache_clear()
    return bare, fake


def traffic_recipe(path: str, overrides: list[str], peak: float = PEAK, bandwidth: float = BANDWIDTH) -> dict:
    """Build the recipe's teachers, student, loss and optimiser on the CPU, make their tensors fake, run one
    bare training step on a fake batch of the recipe's shapes and count each phase."""
    recipe = load_one_batch(path, overrides)
    bare, fake = fake_bare_step(recipe)
    # the routers mix as on a GPU (multiply-adds; eager on the CPU the student takes a batched product)
    as_on_a_gpu = mock.patch("sak.student.router._use_multiply_adds", return_value=True)

    phases: dict[str, dict] = {}
    seconds: dict[str, dict] = {}
    modules: dict[str, dict[str, int]] = {}

    def counted(name, fn):
        with ModuleTracker() as tracker, CountTraffic(tracker, peak, bandwidth) as counter:
            result = fn()
        phases[name], seconds[name] = dict(counter.rows), dict(counter.seconds)
        modules[name] = dict(counter.modules)
        return result

    with fake, as_on_a_gpu:
        bare.run(lambda name, fn: fn())  # the first step creates the optimiser (on the fake parameters) and its state
        bare.run(counted)
        # the FLOPs the model defines, for MFU as benchmarks/throughput.py counts it: SAM's attention as
        # written, not the fused rewrite whose padded, bias-folded head width does more products
        for module in (m for t in bare.teachers.values() for m in t.modules()):
            vars(module).pop("forward", None)
        with CountTraffic() as counter:
            for t in bare.teachers.values():
                t.encode(bare.batch["image"], None)  # in float32, as throughput.py: FLOPs do not depend on it
        model_teacher_flops = sum(r[2] for r in counter.rows.values())
    for cached in CACHES:
        cached.cache_clear()

    result = {"recipe": path, "overrides": overrides, "batch": recipe.data.batch_size, "phases": []}
    # as throughput.py counts model FLOPs: the teachers' and the student step's, not loss.normalize's maps
    student = [name for name in phases if not name.startswith("teacher") and name != "normalize targets"]
    student_flops = sum(r[2] for name in student for r in phases[name].values())
    result["model_tflop"] = (model_teacher_flops + student_flops) / 1e12
    for name, rows in phases.items():
        entry = {
            "phase": name,
            "operations": sum(r[0] for r in rows.values()),
            "gbytes": sum(r[1] for r in rows.values()) / 1e9,
            "tflop": sum(r[2] for r in rows.values()) / 1e12,
            "roofline_ms": 1e3 * sum(s[0] for s in seconds[name].values()),
            "flop_bound_ms": 1e3 * sum(s[1] for s in seconds[name].values()),
            "top": [
                {
                    "op": op,
                    "dtype": dt,
                    "calls": n,
                    "gbytes": moved / 1e9,
                    "tflop": flops / 1e12,
                    "roofline_ms": 1e3 * seconds[name][(op, dt)][0],
                }  # fmt: skip
                for (op, dt), (n, moved, flops) in sorted(rows.items(), key=lambda kv: -seconds[name][kv[0]][0])
            ],
            "forward_by_module": [  # empty for backward and the optimiser
                {"module": m, "gbytes": moved / 1e9}
                for m, moved in sorted(modules[name].items(), key=lambda kv: -kv[1])
            ],
        }
        result["phases"].append(entry)
    return result


_SDPA = F.scaled_dot_product_attention


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if q.device.type != "cuda" or attn_mask is not None or enable_gqa:
        return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    if v.shape[-1] != q.shape[-1]:  # the flash kernel refuses unequal widths (SAM's folded attention, v narrow)
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, False, dropout_p, is_causal, scale=scale
        )[0]
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]


@contextlib.contextmanager
def cuda_autocast_without_a_gpu():
    """Let fake CUDA tensors run as on a GPU: torch.autocast("cuda") turns itself off when no device is there
    (made to believe there is one with bf16), and scaled_dot_product_attention, which asks the device which
    fused kernels it has and falls back to the unfused math kernel, is sent to the flash kernel (the H100
    picks cuDNN's, which reads and writes the same tensors), or, where v is narrower than q and k, to the
    memory-efficient one."""
    with (
        mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
        mock.patch.object(F, "scaled_dot_product_attention", _flash_sdpa),
    ):
        yield


def cuda_forward(path: str, overrides: list[str]) -> dict[str, dict]:
    """The forward phases (teachers, student forward, losses) counted on fake CUDA tensors under CUDA autocast,
    whose op lists differ from the CPU autocast the step is otherwise counted under. Backward cannot run this
    way: the autograd engine needs a real CUDA context (pytorch/pytorch#92627)."""
    recipe = load_one_batch(path, overrides)
    phases: dict[str, dict] = {}

    def counted(name, fn):
        if name in ("backward", "optimiser"):
            return None
        with CountTraffic() as counter:
            result = fn()
        phases[name] = dict(counter.rows)
        return result

    with cuda_autocast_without_a_gpu():
        bare, fake = fake_bare_step(recipe, "cuda")
        with fake:
            bare.run(counted)
    for cached in CACHES:
        cached.cache_clear()
    return phases


def compare_forward(result: dict, cuda_phases: dict[str, dict], count: int = 4) -> list[dict]:
    """Per forward phase, bytes and operations under CPU autocast (the counted step) and CUDA autocast, and the
    operations whose bytes differ most."""
    rows = []
    for p in result["phases"]:
        if p["phase"] not in cuda_phases:
            continue
        diff = collections.Counter()  # the CPU and CUDA flash attention kernels as one operation
        for t in p["top"]:
            diff[(t["op"].removesuffix("_for_cpu"), t["dtype"])] -= t["gbytes"]
        for (op, dt), (_, moved, _) in cuda_phases[p["phase"]].items():
            diff[(op, dt)] += moved / 1e9
        rows.append(
            {
                "phase": p["phase"],
                "cpu_autocast_gbytes": p["gbytes"],
                "cuda_autocast_gbytes": sum(r[1] for r in cuda_phases[p["phase"]].values()) / 1e9,
                "cpu_autocast_operations": p["operations"],
                "cuda_autocast_operations": sum(r[0] for r in cuda_phases[p["phase"]].values()),
                "largest_differences": [
                    {"op": op, "dtype": dt, "gbytes": gb}
                    for (op, dt), gb in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:count]
                    if abs(gb) >= 0.05
                ],
            }
        )
    return rows


def markdown(results: list[dict], rows: int, peak: float, bandwidth: float, command: str,
             dense_peak: float = DENSE_PEAK) -> str:  # fmt: skip
    rates = ("70% of an H100's dense bf16 peak, 90% of its HBM3 bandwidth" if (peak, bandwidth) == (PEAK, BANDWIDTH)
             else "as given by --peak and --bandwidth")  # fmt: skip
    lines = [
        "# Memory traffic and FLOPs of one training step of the GPU recipes (counted on the CPU)",
        "",
        f"Command: `{command}` ({torch.__version__}). Fake tensors at the recipes' real shapes: per phase, the "
        "kernel-launching aten operations, the bytes they read and write (unfused: each operation's inputs and "
        "outputs), their FLOPs, and a roofline estimate of the GPU time, the sum over calls of "
        f"max(FLOPs / {peak / 1e12:.0f} TFLOP/s, bytes / {bandwidth / 1e12:.2f} TB/s) ({rates}). "
        "It is a lower bound for eager execution; see the docstring of "
        "benchmarks/step_traffic.py.",
        "",
    ]
    for res in results:
        overrides = " ".join(res["overrides"])
        lines += [f"## {res['recipe']} (batch {res['batch']}{', ' + overrides if overrides else ''})", ""]
        lines += [
            "| phase | operations | GB moved | TFLOP | roofline ms | of it in FLOP-bound operations |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        total = collections.Counter()
        for p in res["phases"]:
            share = p["flop_bound_ms"] / p["roofline_ms"] if p["roofline_ms"] else 0.0
            lines.append(
                f"| {p['phase']} | {p['operations']} | {p['gbytes']:.1f} | {p['tflop']:.2f} | {p['roofline_ms']:.1f} "
                f"| {share:.0%} |"
            )
            student = not p["phase"].startswith("teacher")
            for key in ("operations", "gbytes", "tflop", "roofline_ms", "flop_bound_ms"):
                total[key] += p[key]
                total[f"student {key}"] += p[key] if student else 0
        lines.append(
            f"| whole step | {total['operations']} | {total['gbytes']:.1f} | {total['tflop']:.2f} | "
            f"{total['roofline_ms']:.1f} | {total['flop_bound_ms'] / total['roofline_ms']:.0%} |"
        )
        lines.append(
            f"| student step (no teachers: a cached step) | {total['student operations']} | "
            f"{total['student gbytes']:.1f} | {total['student tflop']:.2f} | {total['student roofline_ms']:.1f} | "
            f"{total['student flop_bound_ms'] / total['student roofline_ms']:.0%} |"
        )
        lines.append("")
        mfu = res["model_tflop"] * 1e12 / (total["roofline_ms"] / 1e3) / dense_peak
        lines.append(
            f"Model-FLOPs utilisation if every operation ran at its roofline: {mfu:.0%} of the dense bf16 peak "
            f"({dense_peak / 1e12:.0f} TFLOP/s; {res['model_tflop']:.2f} TFLOP per step as benchmarks/throughput.py counts them, "
            "SAM's attention as the model defines it)."
        )
        lines.append("")
        for p in res["phases"]:
            top = ", ".join(
                f"{t['op']} {t['dtype']} x{t['calls']} {t['gbytes']:.1f} GB"
                + (f" {t['tflop']:.2f} TF" if t["tflop"] else "")
                for t in p["top"][:rows]
            )
            lines.append(f"- {p['phase']}: {top}")
        lines += ["", "Forward bytes by module (list indices shown as N, so that a stack's blocks add up):", ""]
        for p in res["phases"]:
            by_module = [m for m in p["forward_by_module"] if m["module"] != "Global"]  # "Global": outside modules
            if by_module:
                top = ", ".join(f"{m['module']} {m['gbytes']:.1f} GB" for m in by_module[:rows])
                lines.append(f"- {p['phase']}: {top}")
        lines.append("")
        if res.get("cuda_forward"):
            lines += [
                "The forward phases again on fake CUDA tensors under CUDA autocast (its op lists differ from the CPU",
                "autocast counted above; backward cannot run without a real CUDA context):",
                "",
                "| phase | GB, CPU autocast | GB, CUDA autocast | operations, CPU / CUDA | largest differences (CUDA - CPU) |",
                "| --- | --- | --- | --- | --- |",
            ]
            for c in res["cuda_forward"]:
                largest = ", ".join(f"{d['op']} {d['dtype']} {d['gbytes']:+.1f} GB" for d in c["largest_differences"])
                lines.append(
                    f"| {c['phase']} | {c['cpu_autocast_gbytes']:.1f} | {c['cuda_autocast_gbytes']:.1f} "
                    f"| {c['cpu_autocast_operations']} / {c['cuda_autocast_operations']} | {largest or '-'} |"
                )
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipe", action="append", help='a recipe, optionally with its own overrides: "PATH KEY=VALUE ..."'
    )
    parser.add_argument("--rows", type=int, default=8, help="largest operations listed per phase")
    parser.add_argument("--peak", type=float, default=PEAK, help="FLOP/s reached by large matrix products")
    parser.add_argument("--bandwidth", type=float, default=BANDWIDTH, help="bytes/s reached by streaming kernels")
    parser.add_argument("--dense-peak", type=float, default=DENSE_PEAK,
                        help="the GPU's dense bf16 peak (FLOP/s), which model-FLOPs utilisation is taken against")  # fmt: skip
    parser.add_argument("--out", default=str(RESULTS / "step_traffic"), help="writes OUT.json and OUT.md")
    parser.add_argument(
        "--no-cuda-forward", action="store_true", help="skip counting the forward phases again under CUDA autocast"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    recipes = args.recipe or DEFAULT_RECIPES
    results = []
    for spec in recipes:
        path, *own = spec.split()
        result = traffic_recipe(path, [*args.overrides, *own], args.peak, args.bandwidth)
        if not args.no_cuda_forward:
            result["cuda_forward"] = compare_forward(result, cuda_forward(path, [*args.overrides, *own]))
        results.append(result)
    command = "python -m benchmarks.step_traffic " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, args.rows, args.peak, args.bandwidth, command.strip(), args.dense_peak)
    Path(f"{args.out}.json").write_text(
        json.dumps({"torch": torch.__version__, "command": command, "recipes": results}, indent=2)
    )
    Path(f"{args.out}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
