"""Sharding a stage's policy with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Under Lightning's `ModelParallelStrategy` a stage shards its policy in `configure_model`:
each module of `policy.shard_modules()` (the denoiser's transformer blocks) becomes its own
FSDP unit, then the denoiser itself (the parameters left outside the blocks: embeddings,
the output head), all on the data-parallel mesh. Everything else is left alone and so is
replicated on every rank: the frozen condition encoders, the reward judges, the segmenter,
the metric networks. They never train, so nothing has to keep them in sync.

Why FSDP2 and not Lightning's `FSDPStrategy` (FSDP1): GRPO needs manual optimisation, which
FSDP1 does not support (Lightning issues #19685, #20138; see the project's FACTS.md).

`ShardingSettings` are the stage's constructor argument `sharding` (configs/strategy/
fsdp.yaml sets them): mixed precision (parameters gathered and computed in `param_dtype`,
gradients reduced in `reduce_dtype`, the sharded master weights and the optimiser state in
float32), activation checkpointing of each block, and whether a block frees its gathered
parameters after its forward.
"""

from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ShardingSettings:
    """How a stage shards its policy under `ModelParallelStrategy` (ignored otherwise).

    param_dtype:              dtype of the gathered parameters and of forward/backward
                              ("bfloat16" by default; "float32" computes in full precision)
    reduce_dtype:             dtype of the gradient reduce-scatter ("float32")
    activation_checkpointing: recompute each block's activations in backward instead of
                              storing them (less memory, about one more forward of time):
                              turns on the policy's `checkpoint_activations`, the same
                              switch as the policy's own argument (False leaves the
                              policy's setting as it is)
    reshard_after_forward:    free each block's gathered parameters after its forward (True,
                              ZeRO-3 style) or keep them until backward (False: less traffic)
    """

    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self):
        for key in ("param_dtype", "reduce_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(
                    f"sharding.{key} must be one of {sorted(DTYPES)}, got {getattr(self, key)!r}"
                )


# stages keep their settings in the checkpoint's hyper-parameters (loaded weights_only)
torch.serialization.add_safe_globals([ShardingSettings])


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` is an FSDP2 unit (`fully_shard` applied to it)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_policy(policy, mesh, settings: ShardingSettings) -> list[nn.Module]:
    """Apply `fully_shard` to each of `policy.shard_modules()`, then to `policy.denoiser`,
    on `mesh` (the data-parallel mesh); returns the sharded blocks.

    Only the denoiser is sharded, so only it may train: a trainable parameter elsewhere
    (the text encoder of an SFT run without LoRA) would never have its gradient averaged
    over the ranks, and the replicas would drift apart. That is refused here.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    denoiser = policy.denoiser
    outside = [
        name
        for name, p in policy.named_parameters()
        if p.requires_grad and not any(p is q for q in denoiser.parameters())
    ]
    if outside:
        raise ValueError(
            f"sharding trains only the denoiser, but {type(policy).__name__} also trains "
            f"{outside[:3]}{' ...' if len(outside) > 3 else ''}: their gradients would not be "
            "synchronised across ranks. Train a LoRA adapter (model.init_args.lora) or use "
            "DDP (configs/strategy/ddp.yaml)"
        )
    blocks = list(policy.shard_modules())
    if not blocks:
        raise ValueError(f"{type(policy).__name__}.shard_modules() returned no module to shard")
    mp = MixedPrecisionPolicy(
        param_dtype=DTYPES[settings.param_dtype], reduce_dtype=DTYPES[settings.reduce_dtype]
    )
    kwargs = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=settings.reshard_after_forward)
    if settings.activation_checkpointing:
        # the policy's own switch (`EditPolicy.checkpoint_activations`), so that this flag and
        # the policy's never put two checkpointing mechanisms on one block; parameter names
        # (and so checkpoints) stay those of the unsharded model
        policy.checkpoint_activations(True)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(denoiser, **kwargs)
    return blocks
