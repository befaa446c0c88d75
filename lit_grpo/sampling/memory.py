"""What one GRPO step's rollouts hold in memory, and what the machine has: a setting that
cannot fit is refused before the first rollout, not found out after minutes of swapping.

The estimate is a lower bound: the `RolloutRecord` of one step (float32 latents, whatever the
policy's dtype, and the encoded condition repeated per rollout) for the rows of this rank. The policy's own activations come on top; they
scale with `micro_batch_size` rows per pass, not with the group.
"""

import os

import torch

from lit_grpo.checks import ConfigError
from lit_grpo.sampling.strategies import SamplingPlan

GiB = 1024**3


def rollout_bytes(
    rows: int,
    plan: SamplingPlan,
    latent: tuple[int, int, int],
    image: tuple[int, int, int],
    condition: int = 0,
) -> int:
    """Bytes of a `RolloutRecord` of `rows` rollouts: the encoded condition repeated per
    rollout (`condition` bytes a row), states, next states and (SDE steps) per-element
    log-probs [rows, K, C, h, w], final latents [rows, C, h, w] and decoded images
    [rows, 3, H, W], all float32."""
    c, h, w = latent
    per_step = 3 if plan.sde_steps else 2  # ODE-trained plans record no log-probs
    floats = (
        len(plan.train_steps) * per_step * c * h * w + c * h * w + image[0] * image[1] * image[2]
    )
    return rows * (floats * 4 + condition)


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes free for new tensors, what they are) on `device`: a GPU's free memory plus
    what PyTorch caches unused; on the CPU, the kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"GPU memory on {device}"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "memory (MemAvailable)"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "memory"


def check_rollout_memory(
    batch_size: int,
    group_size: int,
    plan: SamplingPlan,
    latent: tuple[int, int, int],
    image: tuple[int, int, int],
    condition: int,
    available: int,
    what: str,
) -> None:
    """Refuse, in one line with the estimate, rollouts that need more than `available`."""
    rows = batch_size * group_size
    need = rollout_bytes(rows, plan, latent, image, condition)
    if need <= available:
        return
    c, h, w = latent
    raise ConfigError(
        f"one GRPO step's rollouts need at least {need / GiB:.1f} GiB ({rows} rollouts = "
        f"batch_size {batch_size} x group_size {group_size}, {len(plan.train_steps)} trained "
        f"steps of {c}x{h}x{w} float32 latents each), more than the {available / GiB:.1f} GiB "
        f"of {what} available. Lower --model.init_args.group_size or --data.init_args."
        "batch_size (or the trained steps: sample_steps, the strategy's exit_step)"
    )
