"""`python -m lit_grpo export CKPT OUT`: a lit_grpo checkpoint's policy as a weights file.

The file is a .safetensors with the adapter merged in and the policy's class and config in
its metadata, loadable with `policy.init_args.weights: OUT` (or `load_policy(OUT)`). A
checkpoint of a diffusers policy trained with LoRA holds the adapter alone: the frozen
weights are read from the pretrained folder it records (or `--pretrained`, if it moved).

`--lora-diffusers` writes the checkpoint's LoRA adapter alone, in the layout diffusers'
pipelines load with `load_lora_weights` (FLUX.1-Kontext, Qwen-Image-Edit); the policy is
not built, so a checkpoint of a 12B backbone exports in seconds.
"""

import argparse
import sys

HELP = "write the policy of a lit_grpo checkpoint as a .safetensors weights file"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_grpo export", description=HELP)
    parser.add_argument("ckpt", help="a .ckpt written by a lit_grpo stage (or a .safetensors)")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--half", action="store_true", help="store float16 (half the size)")
    parser.add_argument(
        "--lora-diffusers",
        action="store_true",
        help="write only the LoRA adapter, in diffusers' layout (pipe.load_lora_weights(OUT))",
    )
    parser.add_argument(
        "--pretrained",
        help="the policy's local pretrained folder, where it is now (default: the path the "
        "checkpoint records; its frozen weights are read from there)",
    )
    parser.add_argument(
        "--module",
        default="policy.transformer",
        help="with --lora-diffusers: the checkpoint's module that carries the adapter",
    )
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error(f"OUT must end in .safetensors, got {args.out!r}")

    from pathlib import Path

    from lit_grpo.checks import ConfigError, ensure_writable_dir

    out = Path(args.out).expanduser()
    if out.resolve() == Path(args.ckpt).expanduser().resolve():
        parser.error("OUT must not be the checkpoint it exports")
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    ensure_writable_dir(out.parent, "output directory (OUT)")
    if args.lora_diffusers:
        return _export_diffusers_lora(args.ckpt, args.out, args.module, args.half)
    from lit_grpo.policies.weights import load_policy, recorded_resolution, save_policy_weights

    policy = load_policy(args.ckpt, **({"pretrained": args.pretrained} if args.pretrained else {}))
    if args.half:
        policy.half()
    path = save_policy_weights(policy, args.out, resolution=recorded_resolution(args.ckpt))
    n = sum(p.numel() for p in policy.parameters())
    print(
        f"wrote {type(policy).__name__} ({n / 1e6:.2f}M parameters) to {path} "
        f"({path.stat().st_size / 2**20:.1f} MiB)"
    )
    return 0


def _export_diffusers_lora(ckpt_path: str, out: str, module: str, half: bool) -> int:
    from lit_grpo.checks import ConfigError, local_copy, read_checkpoint
    from lit_grpo.policies.lora import LoraSettings, save_diffusers_lora_tensors

    ckpt = read_checkpoint(local_copy(ckpt_path, "checkpoint"), "checkpoint")
    prefix = module + "."
    tensors = {}
    for key, value in (ckpt.get("state_dict") or {}).items():
        if key.startswith(prefix) and "lora_" in key:
            name = key[len(prefix) :].replace(".lora_A.default.", ".lora_A.")
            tensors[name.replace(".lora_B.default.", ".lora_B.")] = value.half() if half else value
    settings = (ckpt.get("hyper_parameters") or {}).get("lora")
    if not tensors or settings is None:
        raise ConfigError(
            f"{ckpt_path} holds no LoRA adapter under {module!r} (a stage trained with `lora:` "
            "writes one); pass --module if the adapter sits elsewhere"
        )
    if isinstance(settings, dict):
        settings = LoraSettings(**settings)
    save_diffusers_lora_tensors(tensors, settings, out)
    print(f"wrote the LoRA adapter ({len(tensors)} tensors, rank {settings.rank}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
