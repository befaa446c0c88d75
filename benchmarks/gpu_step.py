"""GPU benchmark: one GRPO step of a ~1B Flux-style editor, phase by phase, against the
transformer's own plain forward and forward+backward rates measured in the same run.

    python benchmarks/gpu_step.py                      # 1024 px, G = 16, on the GPU
    python benchmarks/gpu_step.py --resolution 512 --group-size 8 --micro-batch 4
    python benchmarks/gpu_step.py --tiny               # CPU smoke run, seconds

What runs: `GRPOModule` under a Lightning `Trainer` (manual optimisation, the CLI's path)
with lit_grpo's `FluxKontextPolicy` (the policy `configs/backbones/flux_kontext.yaml`
loads), built with `FluxKontextPolicy.from_components` from a random-init diffusers
`FluxTransformer2DModel` (double- and single-stream blocks, 128-dim heads, guidance
embedding; `--layers`, `--single-layers`, `--heads` size it, the parameter count is
printed), G rollouts of each condition with the SDE on every step but the last, a cheap
device-side reward, and the update over every trained step. `lit_grpo.callbacks.ThroughputMonitor` times the phases (CUDA events) and
counts their FLOPs (FlopCounterMode, first step; that step and the next, a warm-up, are not
timed). Before the first step, the same transformer runs plain forwards (at the
micro-batch of sampling, no grad) and forward+backward passes (the same rows, with the
training's requires_grad) on the same token shapes and precision: the reference rates.

Printed: one table row (markdown) with the device, the parameter count, seconds per GRPO
step, images per second, the rollout phase's TFLOP/s and its share of the plain forward
rate, the update's and its share of the plain forward+backward rate, the plain rates, and
the peak memory (CUDA: `max_memory_allocated` over the GRPO steps; CPU: the process's peak
RSS).

No weights can be downloaded here, so only the transformer is full-size; the other parts
keep what decides its cost and are cheap (`flux_parts`): an `AutoencoderKL` with FLUX.1's
latent layout (16 channels at 1/8 of the image side, so the same token counts: the target's
and the source image's tokens side by side, Kontext's layout) but 4 channels per level and
no mid-block attention, and a `WordEmbedder` in place of CLIP + T5 that gives 512 tokens
of width 4096 (T5-XXL's) and a pooled vector of 768 (CLIP's). Their FLOPs are in the
rollout phase's count too (the VAE's decode is a sliver of it).
"""

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_grpo.callbacks import ThroughputMonitor  # noqa: E402
from lit_grpo.modules import GRPOModule  # noqa: E402
from lit_grpo.objectives import FlowGRPO  # noqa: E402
from lit_grpo.perception.detections import Detections  # noqa: E402
from lit_grpo.policies import FluxKontextPolicy  # noqa: E402
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


def flux_parts(args) -> tuple[nn.Module, nn.Module, nn.Module]:
    """A random-init `FluxTransformer2DModel`, a cheap `AutoencoderKL` with FLUX.1's latent
    layout (16 channels at 1/8 of the image side, FLUX.1's scale and shift) and a
    `WordEmbedder` giving T5-shaped tokens (512 of width 4096; 8 of width 32 with --tiny)
    and a CLIP-shaped pooled vector."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from lit_grpo.policies.diffusers_common import WordEmbedder

    if args.tiny:
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=[4, 6, 6],
        )
        text = WordEmbedder(32, 32, max_words=8)
    else:
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2 x 2 (FLUX.1)
            num_layers=args.layers,
            num_single_layers=args.single_layers,
            attention_head_dim=128,
            num_attention_heads=args.heads,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,  # FLUX.1-Kontext [dev] is guidance-distilled
            axes_dims_rope=[16, 56, 56],
        )
        text = WordEmbedder(4096, 768, max_words=512)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplings: 1/8 of the side
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    return transformer, vae, text


def build_policy(args) -> FluxKontextPolicy:
    """The real `FluxKontextPolicy` (what `configs/backbones/flux_kontext.yaml` loads from a
    folder) over the parts of `flux_parts`."""
    transformer, vae, text = flux_parts(args)
    return FluxKontextPolicy.from_components(
        transformer, vae, text, gradient_checkpointing=args.checkpointing
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
    policy = build_policy(args)
    params = sum(p.numel() for p in policy.transformer.parameters())
    print(f"transformer: {params:,} parameters", flush=True)
    module = GRPOModule(
        policy,
        [Brightness()],
        segmenter=WholeImage(),
        group_size=args.group_size,
        sample_steps=args.sample_steps,
        micro_batch_size=args.micro_batch,
        objective=FlowGRPO(clip_range=1e-3),
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
