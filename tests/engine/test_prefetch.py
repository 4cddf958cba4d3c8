"""`data.prefetch_to_device`: batches handed out one ahead, in order, and training unchanged by it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sak.config import RecipeError
from sak.engine import train
from sak.engine.cache import build_cache
from sak.engine.checkpoint import latest_checkpoint
from sak.engine.prefetch import DevicePrefetcher, prefetch_enabled


def logged(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(run_dir):
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"))


def test_prefetcher_hands_out_every_batch_in_order_reading_exactly_one_ahead():
    pulled = []

    def source(n):
        for i in range(n):
            pulled.append(i)
            yield {"x": torch.full((2,), float(i)), "ids": [f"s{i}"], "nested": {"y": torch.tensor([i])}}

    prefetch = DevicePrefetcher("cpu")
    seen = []
    for batch in prefetch(source(4)):
        k = int(batch["x"][0])
        assert pulled == list(range(min(k + 2, 4)))  # batch k+1 was read (and its copy issued) before k is used
        seen.append((k, batch["ids"], int(batch["nested"]["y"])))
    assert seen == [(k, [f"s{k}"], k) for k in range(4)]
    assert list(prefetch(source(0))) == [] and len(list(prefetch(source(1)))) == 1


def test_training_with_prefetch_is_the_same_run_and_resumes_exactly(tiny_recipe, capsys):
    """The same losses and weights as Accelerate's own device placement, and a stop + resume mid-epoch (the
    loader restarts past the trained batches, one batch having been read ahead) gives the straight run."""
    common = ["schedule.max_steps=10", "student.model_kwargs.drop_path_rate=0.1"]  # 8 batches per epoch
    plain = tiny_recipe(*common, "run.name=plain")
    straight = tiny_recipe(*common, "run.name=straight", "data.prefetch_to_device=true")
    train(plain)
    assert "data.prefetch_to_device" not in capsys.readouterr().out
    train(straight)
    assert "each batch copied to the device during the step before (data.prefetch_to_device)" in capsys.readouterr().out
    assert logged(straight.run_dir) == logged(plain.run_dir) and len(logged(plain.run_dir)) == 10
    split = tiny_recipe(*common, "run.name=split", "data.prefetch_to_device=true", "run.stop_at=3")
    assert train(split) == {}
    train(tiny_recipe(*common, "run.name=split", "data.prefetch_to_device=true"))
    assert logged(split.run_dir) == logged(straight.run_dir)
    a, b, c = weights(plain.run_dir), weights(straight.run_dir), weights(split.run_dir)
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(b[key], c[key]), key


def test_training_from_a_cache_with_prefetch_matches_without(tiny_recipe, tmp_path):
    common = ["schedule.max_steps=6", "data.num_workers=2"]
    root = build_cache(tiny_recipe(*common), tmp_path / "c", dtype="int8", shard_size=16)
    runs = [tiny_recipe(*common, f"run.name=p{int(on)}", f"cache.path={root}", f"data.prefetch_to_device={on}")
            for on in (False, True)]  # fmt: skip
    for r in runs:
        train(r)
    assert logged(runs[1].run_dir) == logged(runs[0].run_dir) and len(logged(runs[0].run_dir)) == 6


def test_auto_reads_ahead_only_for_a_cache_on_cuda_without_accumulation():
    assert prefetch_enabled("auto", "cuda", cached=True, grad_accum=1)
    assert prefetch_enabled("auto", torch.device("cuda", 1), cached=True, grad_accum=1)
    assert not prefetch_enabled("auto", "cpu", cached=True, grad_accum=1)
    assert not prefetch_enabled("auto", "cuda", cached=False, grad_accum=1)  # online: images, a small copy
    assert not prefetch_enabled("auto", "cuda", cached=True, grad_accum=2)  # would end an accumulation early
    assert prefetch_enabled(True, "cpu", cached=False, grad_accum=1)
    assert not prefetch_enabled(False, "cuda", cached=True, grad_accum=1)


def test_auto_prefetch_is_accepted_with_gradient_accumulation(tiny_recipe):
    recipe = tiny_recipe("optim.grad_accum=2")
    assert recipe.data.prefetch_to_device == "auto"


def test_prefetch_with_gradient_accumulation_is_refused(tiny_recipe):
    with pytest.raises(RecipeError, match=r"data.prefetch_to_device: needs optim.grad_accum=1, got 2"):
        tiny_recipe("data.prefetch_to_device=true", "optim.grad_accum=2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_step_stream_waits_for_its_batch_copy_and_only_for_it():
    """Batches of 256 MiB (about 10 ms each over PCIe), checked by the first kernel the step's stream runs on
    them with no host wait in between: the host hands out batch k+1 microseconds after issuing its copy, so a
    step stream that did not wait for the copy would read a half-copied batch. All six arrive complete."""
    host = [{"x": torch.full((64, 1024, 1024), float(i)).pin_memory(), "id": [i]} for i in range(6)]
    prefetch = DevicePrefetcher("cuda")
    complete = []
    for i, batch in enumerate(prefetch(host)):
        assert batch["x"].is_cuda and batch["id"] == [i]
        complete.append((batch["x"] == float(i)).all())  # queued on the step's stream, not waited for here
    assert torch.stack(complete).tolist() == [True] * 6


def test_a_mid_epoch_resume_keeps_the_loaders_asynchronous_copies():
    """Accelerate's skip_first_batches rebuilds the loader without non_blocking / drop_last
    (huggingface/accelerate#4295); the trainer's wrapper carries them over."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from sak.engine.trainer import skip_first_batches

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(non_blocking=True))
    loader = accelerator.prepare(torch.utils.data.DataLoader(torch.arange(18), batch_size=4, drop_last=True))
    assert loader._non_blocking and loader._drop_last
    skipped = skip_first_batches(accelerator, loader, 1)
    assert skipped._non_blocking and skipped._drop_last
    assert [b.tolist() for b in skipped] == [[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
