"""The Accelerator a run trains with, and the launch settings it refuses."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType

from ..config import Recipe, RecipeError


def make_accelerator(recipe: Recipe) -> Accelerator:
    """Accelerate on the GPU when there is one, else on the CPU (so that `accelerate launch --multi_gpu
    --num_processes 2` forms a true 2-process gloo world on a CPU-only machine)."""
    cpu = not torch.cuda.is_available()
    if cpu and "fp16" in (recipe.precision.mixed, recipe.precision.teachers):
        raise RecipeError(
            "precision: fp16 needs a CUDA GPU; on the CPU Accelerate would silently run fp32. Use bf16 or no."
        )
    trackers = (["wandb"] if recipe.logging.wandb.mode != "disabled" else []) + (
        ["tensorboard"] if recipe.logging.tensorboard else []
    )
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=recipe.precision.mixed,
        gradient_accumulation_steps=recipe.optim.grad_accum,
        log_with=trackers or None,
        project_dir=str(recipe.run_dir),
        step_scheduler_with_optimizer=False,  # we step it once per optimiser step, whatever the world size
        # Batches cross to the GPU with asynchronous copies from the loader's page-locked memory (build_loader
        # pins on CUDA): the host goes on to launch the step's kernels instead of waiting for the copy, which
        # a cached batch makes large (505 MB at the ViT-B stage-1 scale). No effect on the CPU.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    check_launch_settings(accelerator, recipe)
    return accelerator


def check_launch_settings(accelerator: Accelerator, recipe: Recipe) -> None:
    """Accelerate takes ACCELERATE_GRADIENT_ACCUMULATION_STEPS (`accelerate launch --gradient_accumulation_steps`)
    over the value sak passes (checked after `prepare` again, where a plugin may set it): the steps' images,
    the schedule's length and the recorded recipe would be other than the run's. DeepSpeed and FSDP are refused."""
    settings = [  # (key, the recipe's, Accelerate's, what sets Accelerate's)
        ("optim.grad_accum", recipe.optim.grad_accum, accelerator.gradient_accumulation_steps,
         "the environment's ACCELERATE_GRADIENT_ACCUMULATION_STEPS, or a plugin"),
        ("precision.mixed", recipe.precision.mixed, accelerator.state.mixed_precision,
         "an Accelerate state made before in this process, or a plugin"),
    ]  # fmt: skip
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise RecipeError(
            "DeepSpeed steps the optimiser inside backward, before sak's non-finite check, and clips by its own "
            "config, not optim.grad_clip: sak's loop does not run under it; launch with --multi_gpu (DDP)"
        )
    if accelerator.distributed_type == DistributedType.FSDP:  # (Accelerate writes pytorch_model_fsdp*.bin or shards)
        raise RecipeError("FSDP is not supported: its checkpoints hold no model.safetensors, which resume, "
                          "checkpoint.init_from, sak export and sak eval read; launch with --multi_gpu (DDP)")  # fmt: skip
    for key, asked, got, cause in settings:
        if asked != got:
            raise RecipeError(f"{key} is {asked!r} but Accelerate was configured with {got!r} ({cause}); set it "
                              f"in the recipe ({key}={got}) and leave it out of the launch")  # fmt: skip
