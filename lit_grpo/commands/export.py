"""`python -m lit_grpo export CKPT OUT`: a lit_grpo checkpoint's policy as a weights file.

The file is a .safetensors with the adapter merged in and the policy's class and config in
its metadata, loadable with `policy.init_args.weights: OUT` (or `load_policy(OUT)`).
"""

import argparse
import sys

HELP = "write the policy of a lit_grpo checkpoint as a .safetensors weights file"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_grpo export", description=HELP)
    parser.add_argument("ckpt", help="a .ckpt written by a lit_grpo stage (or a .safetensors)")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--half", action="store_true", help="store float16 (half the size)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error(f"OUT must end in .safetensors, got {args.out!r}")

    from pathlib import Path

    from lit_grpo.checks import ensure_writable_dir

    ensure_writable_dir(Path(args.out).expanduser().parent, "output directory (OUT)")
    from lit_grpo.policies.weights import load_policy, recorded_resolution, save_policy_weights

    policy = load_policy(args.ckpt)
    if args.half:
        policy.half()
    path = save_policy_weights(policy, args.out, resolution=recorded_resolution(args.ckpt))
    n = sum(p.numel() for p in policy.parameters())
    print(
        f"wrote {type(policy).__name__} ({n / 1e6:.2f}M parameters) to {path} "
        f"({path.stat().st_size / 2**20:.1f} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
