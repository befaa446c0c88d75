"""GPU benchmark: one GRPO step of a ~1B Flux-style editor, phase by phase, against the
transformer's own plain forward and forward+backward rates measured in the same run.

    python benchmarks/gpu_step.py                      # 1024 px, G = 16, on the GPU
    python benchmarks/gpu_step.py --resolution 512 --group-size 8 --micro-batch 4
    python benchmarks/gpu_step.py --tiny               # CPU smoke run, seconds

What runs: `GRPOModule` under a Lightning `Trainer` (manual optimisation, the CLI's path)
with a random-init diffusers `FluxTransformer2DModel` (double- and single-stream blocks,
128-dim heads; `--layers`, `--single-layers`, `--heads` size it, the parameter count is
printed) wrapped in `BenchmarkFluxPolicy` below, G rollouts of each condition with the
SDE on every step but the last, a cheap device-side reward, and the update over every
trained step. `lit_grpo.callbacks.ThroughputMonitor` times the phases (CUDA events) and
counts their FLOPs (FlopCounterMode, first step; that step and the next, a warm-up, are not
timed). Before the first step, the same transformer runs plain forwards (at the
micro-batch of sampling, no grad) and forward+backward passes (the same rows, with the
training's requires_grad) on the same token shapes and precision: the reference rates.

Printed: one table row (markdown) with the device, the parameter count, seconds per GRPO
step, images per second, the rollout phase's TFLOP/s and its share of the plain forward
rate, the update's and its share of the plain forward+backward rate, the plain rates, and
the peak memory (CUDA: `max_memory_allocated` over the GRPO steps; CPU: the process's peak
RSS).

`BenchmarkFluxPolicy` is benchmark-only: the real Kontext policy (FLUX.1-Kontext through
diffusers, with its VAE and text encoders) had not landed when this was written. It keeps
what decides the transformer's cost: 16 latent channels at 1/8 of the image side, packed
2 x 2 into tokens, the source image's tokens beside the target's (Kontext's layout, the
condition marked by `img_ids[..., 0] = 1`), 512 text tokens of width 4096 (T5-XXL's).
The VAE is replaced by a fixed pixel-unshuffle and 1 x 1 projection (negligible FLOPs) and
the text encoders by fixed random embeddings.
"""

import argparse
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_grpo.callbacks import ThroughputMonitor  # noqa: E402
from lit_grpo.modules import GRPOModule  # noqa: E402
from lit_grpo.perception.detections import Detections  # noqa: E402
from lit_grpo.policies.base import Condition, EditPolicy  # noqa: E402
from lit_grpo.rewards import Reward, RewardOutput  # noqa: E402

COLUMNS = (
    "device",
    "params",
    "resolution",
    "G",
    "micro-batch",
    "s/step",
    "images/s",
    "rollout TFLOP/s",
    "% of plain fwd",
    "update TFLOP/s",
    "% of plain fwd+bwd",
    "plain fwd TFLOP/s",
    "plain fwd+bwd TFLOP/s",
    "peak memory GiB",
)


@dataclass
class FluxCondition(Condition):
    """`Condition` plus Flux's pooled text embedding `pooled` [N, P]."""

    pooled: Tensor


class BenchmarkFluxPolicy(EditPolicy):
    """A Flux-Kontext-shaped editor around a `FluxTransformer2DModel` (see module docstring)."""

    def __init__(self, transformer: nn.Module, text_tokens: int = 512):
        super().__init__()
        self.transformer = transformer
        cfg = transformer.config
        self.latent_channels = cfg.in_channels // 4  # packed 2 x 2
        g = torch.Generator().manual_seed(0)
        c = self.latent_channels
        # stand-ins for the VAE (8 x 8 pixels <-> c channels) and the text encoders
        self.register_buffer("down", torch.randn(c, 3 * 64, generator=g) / 8)
        self.register_buffer("up", torch.randn(3 * 64, c, generator=g) / math.sqrt(c))
        text = torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g)
        self.register_buffer("text", text)
        self.register_buffer("pooled", torch.randn(1, cfg.pooled_projection_dim, generator=g))

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def encode_images(self, images: Tensor) -> Tensor:
        patches = F.pixel_unshuffle(images * 2 - 1, 8)  # [N, 192, H/8, W/8]
        return torch.einsum("cp,nphw->nchw", self.down.to(patches), patches)

    def decode(self, latents: Tensor) -> Tensor:
        patches = torch.einsum("pc,nchw->nphw", self.up.to(latents), latents)
        return ((F.pixel_shuffle(patches, 8) + 1) / 2).clamp(0, 1).float()

    def encode_condition(self, images: Tensor, instructions) -> FluxCondition:
        n = images.shape[0]
        text = self.text.expand(n, -1, -1)
        return FluxCondition(
            text=text,
            text_mask=torch.ones(text.shape[:2], dtype=torch.bool, device=images.device),
            image=self.encode_images(images),
            pooled=self.pooled.expand(n, -1),
        )

    def velocity(self, latents: Tensor, sigma: Tensor, condition: Condition) -> Tensor:
        n, c, h, w = latents.shape
        dtype = self.latent_dtype
        target, source = _pack(latents), _pack(condition.image.to(latents.dtype))
        ids = _grid_ids(h // 2, w // 2, latents.device)
        source_ids = ids.clone()
        source_ids[:, 0] = 1  # Kontext: the condition image's tokens on their own plane
        out = self.transformer(
            hidden_states=torch.cat([target, source], 1).to(dtype),
            encoder_hidden_states=condition.text.to(dtype),
            pooled_projections=condition.pooled.to(dtype),
            timestep=sigma.to(dtype),  # diffusers' Flux takes timestep / 1000 = sigma
            img_ids=torch.cat([ids, source_ids]),
            txt_ids=torch.zeros(condition.text.shape[1], 3, device=latents.device),
            return_dict=False,
        )[0]
        return _unpack(out[:, : target.shape[1]], c, h, w)

    def latent_shape(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        return self.latent_channels, image_size[0] // 8, image_size[1] // 8

    def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return image_size[0] // 16, image_size[1] // 16


def _pack(x: Tensor) -> Tensor:
    n, c, h, w = x.shape  # [N, C, h, w] -> [N, h/2 * w/2, 4C]
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, 4 * c)


def _unpack(tokens: Tensor, c: int, h: int, w: int) -> Tensor:
    n = tokens.shape[0]
    x = tokens.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, h, w)


def _grid_ids(rows: int, cols: int, device) -> Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    ids = torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3).float()
    return ids.to(device, non_blocking=True)


def flux_transformer(args) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    if args.tiny:
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 6, 6],
        )
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2 x 2 (FLUX.1)
        num_layers=args.layers,
        num_single_layers=args.single_layers,
        attention_head_dim=128,
        num_attention_heads=args.heads,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=False,
        axes_dims_rope=[16, 56, 56],
    )


# --- the data, the reward and the segmenter: cheap, on the device ---------------------------
class SyntheticEdits(torch.utils.data.Dataset):
    """Random source images with one fixed translation instruction (the spec fields that
    `EditSpec.from_batch` reads)."""

    def __init__(self, resolution: int, size: int):
        self.resolution, self.size = resolution, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {
            "source": torch.rand(3, self.resolution, self.resolution, generator=g),
            "instruction": "move the red circle to the left",
            "object": "red circle",
            "task": "translate",
            "direction": torch.tensor([-1.0, 0.0]),
            "angle": torch.tensor(0.0),
            "factor": torch.tensor(1.0),
        }


class Brightness(Reward):
    name = "brightness"

    def forward(self, inputs):
        return RewardOutput(inputs.images.float().mean((1, 2, 3)))


class WholeImage:
    """A segmenter that finds "the object" everywhere, on the device."""

    def __call__(self, images, phrases):
        n, _, h, w = images.shape
        full = torch.ones(n, h, w, dtype=torch.bool, device=images.device)
        box = images.new_tensor([0.0, 0.0, w, h]).float().expand(n, 4)
        zeros = torch.zeros(n, device=images.device)
        return Detections(full[:, 0, 0], full, box, box[:, 2:] / 2, zeros, zeros + h * w)


# --- the plain rates --------------------------------------------------------------------------
class PlainRates(L.Callback):
    """At the start of the fit: the transformer's plain forward and forward+backward rates
    on the rows of one micro-batch, with the policy's token shapes and the run's precision."""

    def __init__(self, args):
        self.args = args
        self.rates: dict[str, float] = {}

    def on_train_start(self, trainer, pl_module):
        from torch.utils.flop_counter import FlopCounterMode

        policy, args = pl_module.policy, self.args
        device = pl_module.device
        rows = args.micro_batch or args.conditions * args.group_size
        source = torch.rand(rows, 3, args.resolution, args.resolution, device=device)
        cond = policy.encode_condition(source, ["edit"] * rows)
        latents = torch.randn_like(cond.image)
        sigma = torch.full((rows,), 0.5, device=device)
        autocast = torch.autocast(device.type, torch.bfloat16, enabled="mixed" in args.precision)
        params = [p for p in policy.denoiser.parameters() if p.requires_grad]

        def forward():
            with torch.no_grad(), autocast:
                policy.velocity(latents, sigma, cond)

        def forward_backward():
            with autocast:
                v = policy.velocity(latents, sigma, cond)
            v.float().square().mean().backward()
            for p in params:
                p.grad = None

        for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            with FlopCounterMode(display=False) as counter:
                fn()
            seconds = _time(fn, device, args.repeats)
            self.rates[name] = counter.get_total_flops() / seconds / 1e12
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)


def _time(fn, device, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs, after one warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000)
        else:
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(out)


class StepRecorder(L.Callback):
    """The monitor's values after every training step (place it after the monitor)."""

    def __init__(self, monitor: ThroughputMonitor):
        self.monitor, self.steps = monitor, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(dict(self.monitor.last))


def run(args) -> dict:
    if args.device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # its bf16 backward crashes at these sizes
    torch.manual_seed(0)
    transformer = flux_transformer(args)
    params = sum(p.numel() for p in transformer.parameters())
    print(f"transformer: {params:,} parameters", flush=True)
    policy = BenchmarkFluxPolicy(transformer, text_tokens=8 if args.tiny else 512)
    policy.checkpoint_activations(args.checkpointing)
    module = GRPOModule(
        policy,
        [Brightness()],
        segmenter=WholeImage(),
        group_size=args.group_size,
        sample_steps=args.sample_steps,
        micro_batch_size=args.micro_batch,
        clip_range=1e-3,
        lr=1e-5,
    )
    monitor = ThroughputMonitor(peak_tflops=args.peak_tflops)
    plain, recorder = PlainRates(args), StepRecorder(monitor)
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=args.iterations,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[plain, monitor, recorder],
    )
    data = torch.utils.data.DataLoader(
        SyntheticEdits(args.resolution, args.iterations * args.conditions),
        batch_size=args.conditions,
    )
    trainer.fit(module, data)
    timed = recorder.steps[2:] or recorder.steps[1:]  # step 0 counted FLOPs, step 1 warmed up
    if not timed:
        raise SystemExit("--iterations must be at least 2 (step 0 only counts FLOPs)")

    def median(key):
        return statistics.median(s[key] for s in timed)

    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        device = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        device = "cpu"
    rollout, update = median("sampling_tflops"), median("update_tflops")
    return {
        "device": device,
        "params": f"{params / 1e9:.3f} B" if params >= 1e8 else f"{params / 1e6:.3f} M",
        "resolution": args.resolution,
        "G": args.group_size,
        "micro-batch": args.micro_batch or args.conditions * args.group_size,
        "s/step": median("step_sec"),
        "images/s": median("images_per_sec"),
        "rollout TFLOP/s": rollout,
        "% of plain fwd": 100 * rollout / plain.rates["fwd"],
        "update TFLOP/s": update,
        "% of plain fwd+bwd": 100 * update / plain.rates["fwd+bwd"],
        "plain fwd TFLOP/s": plain.rates["fwd"],
        "plain fwd+bwd TFLOP/s": plain.rates["fwd+bwd"],
        "peak memory GiB": peak,
    }


def table(row: dict) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return "\n".join(
        [
            "| " + " | ".join(COLUMNS) + " |",
            "|" + " --- |" * len(COLUMNS),
            "| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |",
        ]
    )


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, choices=["cuda", "cpu"])
    p.add_argument("--resolution", type=int, default=1024, help="image side, px")
    p.add_argument("--group-size", type=int, default=16, help="G rollouts per condition")
    p.add_argument("--conditions", type=int, default=1, help="conditions per step (B)")
    p.add_argument("--micro-batch", type=int, default=2, help="rows per forward (0: all)")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--layers", type=int, default=4, help="double-stream blocks")
    p.add_argument("--single-layers", type=int, default=8, help="single-stream blocks")
    p.add_argument("--heads", type=int, default=16, help="attention heads of 128 channels")
    p.add_argument("--precision", default="bf16-mixed", help="the Trainer's precision")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--iterations", type=int, default=5, help="GRPO steps (2 are not timed)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each plain rate")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: looked up)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny model, seconds")
    args = p.parse_args(argv)
    if args.tiny:
        args.device, args.resolution, args.group_size, args.sample_steps = "cpu", 32, 4, 3
        args.micro_batch, args.iterations, args.repeats = 3, 3, 2
    args.micro_batch = args.micro_batch or None
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    row = run(args)
    print(table(row))
    if args.checkpointing:
        print("(activation checkpointing: the update's FLOPs include the recomputed forward)")
    return row


if __name__ == "__main__":
    main()
