"""`python -m lit_grpo edit`: one edit of one image, with any policy `load_policy` can build.

The image is edited at the resolution the policy was trained at when the checkpoint says so
(a lit_grpo .ckpt records its data module's `resolution`; a weights file or policy may carry
a `resolution` too), else at the input's own size; `--size` overrides both. The input is
resized to that size when it differs, and the output keeps it: we show what the model made
rather than resample it back to the input's size.
"""

import argparse
import sys
import time
from pathlib import Path

from lit_grpo.checks import ConfigError, ensure_file, ensure_writable_dir, local_copy

HELP = "edit one image with a lit_grpo checkpoint, a weights file or built-in weights"

EPILOG = """\
size:
  --size if given, else the resolution the checkpoint was trained at (a lit_grpo .ckpt,
  a file written by `export` and the built-in shapeworld-sft, 32 px, record it), else the
  input's size. The output has that size too. The tiny editor runs at any multiple of
  4 px, but attention cost grows with the 4th power of the side: sides above 512 px
  are refused (at 512 px one step takes about a minute on two CPU cores). Other policies
  (FLUX.1-Kontext, Qwen-Image-Edit) take sides up to 2048 px, as the data does.

examples:
  python -m lit_grpo edit --image in.png --instruction "move the red circle left" --out out.png
  python -m lit_grpo edit --ckpt runs/1/<run id>/checkpoints/last.ckpt --image in.png \\
      --instruction "rotate the blue triangle 90 degrees clockwise" --out out.png --seed 3
  python -m lit_grpo edit --ckpt editor.safetensors --size 64 --image in.png \\
      --instruction "make the green square twice as big" --out out.png
  python -m lit_grpo edit --image in.png --mask region.png \\
      --instruction "move the red circle left" --out out.png

mask:
  --mask names a grayscale image the input's size: white (above 50%) where the edit may
  change the image (the object and where it goes). Everywhere else the source is put back
  at every sampling step (Blended Latent Diffusion's step), so those pixels come out as the
  source (the tiny editor) or as the VAE's reconstruction of it (FLUX.1-Kontext,
  Qwen-Image-Edit, whose latents are 8 px: the region grows to whole latents).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lit_grpo edit",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--ckpt",
        default="shapeworld-sft",
        metavar="PATH",
        help="a lit_grpo .ckpt, a .safetensors written by `export`, or a built-in name "
        "(default: shapeworld-sft, the embedded ShapeWorld editor)",
    )
    parser.add_argument("--image", required=True, metavar="FILE", help="the source image")
    parser.add_argument(
        "--instruction",
        required=True,
        metavar="TEXT",
        help='what to do, e.g. "move the red circle left"',
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="where to write the edit (.png, .jpg, ...)"
    )
    parser.add_argument("--steps", type=int, default=10, help="ODE sampling steps (10)")
    parser.add_argument(
        "--shift", type=float, default=1.0, help="sigma-schedule shift; 1 is uniform (1.0)"
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (0)")
    parser.add_argument(
        "--mask",
        metavar="FILE",
        help="white where the edit may change the image; the source is kept elsewhere "
        "(see 'mask' below)",
    )
    parser.add_argument(
        "--size", metavar="N|WxH", help="edit at N x N (or W x H) pixels; see 'size' below"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not args.instruction.strip():
        parser.error("--instruction is empty")
    try:
        args.instruction.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 text
        raise ConfigError(
            f"--instruction {args.instruction!r} is not UTF-8 text; pass the instruction "
            "in UTF-8 (e.g. set LANG=C.UTF-8 in the shell)"
        ) from None
    size = _parse_size(args.size, parser) if args.size else None
    if size:  # any policy's limit at once; the tiny editor's (side_limit) once it is loaded
        from lit_grpo.datamodules.shapeworld import MAX_RESOLUTION

        _check_size(size, "--size", MAX_RESOLUTION)
    device = _parse_device(args.device)
    out = Path(args.out).expanduser()

    from PIL import Image

    Image.init()
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        parser.error(f"--out must name an image file (.png, .jpg, .webp, ...), got {args.out!r}")
    if out.is_dir():
        parser.error(f"--out {args.out!r} is a directory; name a file in it")
    ensure_writable_dir(out.parent, "output directory (--out)")
    path = ensure_file(args.image, "input image (--image)", "Check the path.")
    image, mode = read_image(path, "RGB")
    mask = read_mask(args.mask, (image.height, image.width)) if args.mask else None
    editable = None

    import numpy as np
    import torch

    from lit_grpo.policies.weights import BUILTIN, load_policy, resolve_weights_path

    start = time.perf_counter()
    if args.ckpt not in BUILTIN:
        ensure_file(
            local_copy(args.ckpt, "checkpoint (--ckpt)"),
            "checkpoint (--ckpt)",
            "Pass a lit_grpo .ckpt (runs/<experiment>/<run>/checkpoints/), a .safetensors "
            f"written by `python -m lit_grpo export`, or a built-in name: {', '.join(BUILTIN)}.",
        )
    weights = resolve_weights_path(args.ckpt)
    policy = load_policy(args.ckpt)
    policy = policy.eval().requires_grad_(False).to(device)
    loaded = time.perf_counter() - start
    origin = "built-in weights" if args.ckpt in BUILTIN else str(weights)
    n = sum(p.numel() for p in policy.parameters())
    print(
        f"policy  {type(policy).__name__} ({n / 1e6:.2f}M parameters) from {args.ckpt}"
        f"{' (' + origin + ')' if origin != args.ckpt else ''}, on {device}, "
        f"loaded in {loaded:.1f} s"
    )
    _warn_about_words(policy, args.instruction)

    trained = None if size else trained_resolution(args.ckpt, policy)
    what = "--size" if size else "the checkpoint's resolution" if trained else "the input's size"
    size = size or trained or (image.height, image.width)
    _check_size(size, what, side_limit(policy))
    note = f" ({mode} converted to RGB)" if mode != "RGB" else ""
    print(f"input   {path}: {image.width}x{image.height} px{note}")
    if (image.height, image.width) != size:
        why = "--size" if args.size else "the resolution the checkpoint was trained at"
        image = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
        print(f"        resized to {size[1]}x{size[0]} px ({why})")
    elif not args.size and not trained:
        print(
            "        edited at the input's size: the checkpoint does not say which resolution "
            "it was trained at (--size to choose)"
        )

    if mask is not None:
        editable = mask_at(mask, size)
        share = editable.float().mean().item()
        print(
            f"mask    {args.mask}: {share:.0%} of the image may change; the source is kept "
            "elsewhere at every step"
        )
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # [H, W, 3]
    source = pixels.permute(2, 0, 1)[None].float() / 255  # [1, 3, H, W] in [0, 1]
    generator = torch.Generator().manual_seed(args.seed)  # CPU: the same noise on any device
    start = time.perf_counter()
    try:
        edited = policy.edit(
            source.to(device),
            [args.instruction],
            args.steps,
            args.shift,
            generator,
            editable=None if editable is None else editable[None].to(device),
        )
    except ValueError as err:  # the policy's own check of the input (size, channels)
        raise ConfigError(
            f"{type(policy).__name__} cannot edit a {size[1]}x{size[0]} px image: {err}. "
            "Choose another size with --size"
        ) from None
    took = time.perf_counter() - start
    print(
        f"edit    {args.instruction!r}: {args.steps} steps, shift {args.shift:g}, "
        f"seed {args.seed}, {took:.2f} s"
    )
    result = (edited[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(result).save(out)
    print(f"wrote   {out} ({result.shape[1]}x{result.shape[0]} px)")
    return 0


def read_image(path: Path, mode: str):
    """(the image converted to `mode`, its own mode); a file PIL cannot read is a ConfigError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            return opened.convert(mode), opened.mode
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(f"cannot read {path} as an image: {err}") from None


def read_mask(name: str, image_size: tuple[int, int]):
    """The editable mask [H, W] (bool) from a grayscale image of the input's `image_size`
    (H, W): above 50% is editable. Read before the policy loads, so a bad mask fails fast."""
    import numpy as np
    import torch

    path = ensure_file(name, "mask (--mask)", "Check the path.")
    mask, _ = read_image(path, "L")
    if (mask.height, mask.width) != image_size:
        raise ConfigError(
            f"--mask {path} is {mask.width}x{mask.height} px but the image is "
            f"{image_size[1]}x{image_size[0]} px; draw the mask over the input image"
        )
    editable = torch.from_numpy(np.array(mask, dtype=np.uint8) > 127)
    if not editable.any():
        raise ConfigError(
            f"--mask {path} marks no pixel as editable (white, above 50%): the edit could "
            "change nothing. Paint the object and where it should go white"
        )
    return editable


def mask_at(mask, size: tuple[int, int]):
    """The mask [H, W] at the edit's `size`, resized nearest (like a label map)."""
    import torch

    if tuple(mask.shape) == tuple(size):
        return mask
    grid = torch.nn.functional.interpolate(mask[None, None].float(), size=size, mode="nearest")
    return grid[0, 0] > 0.5


def trained_resolution(weights: str, policy) -> tuple[int, int] | None:
    """(H, W) the policy was trained at, where the checkpoint or the policy records it."""
    from lit_grpo.policies.weights import recorded_resolution

    recorded = recorded_resolution(weights)
    if recorded is not None:
        return recorded
    value = getattr(policy, "resolution", None) or getattr(policy, "config", {}).get("resolution")
    return (value, value) if isinstance(value, int) else None


def _warn_about_words(policy, instruction: str) -> None:
    """Name the words a word-level text encoder cannot read (they all become one UNK token)."""
    from lit_grpo.policies.text import UNK, WordTokenizer

    tokenizer = getattr(policy, "tokenizer", None)
    if not isinstance(tokenizer, WordTokenizer):
        return
    unknown, count = [], 0
    for word in instruction.split():
        ids, mask = tokenizer([word])
        count += int(mask[0].sum()) if ids[0, 0] != 0 else 0
        if (ids[0][mask[0]] == UNK).any():
            unknown.append(word)
    if unknown:
        known = " ".join(tokenizer.vocabulary[:80])
        print(
            f"lit_grpo edit: warning: the policy's text encoder does not know "
            f"{', '.join(map(repr, unknown))}: it reads each as the same <unknown> token. "
            f"Its vocabulary: {known}",
            file=sys.stderr,
        )
    if count > tokenizer.max_words:
        print(
            f"lit_grpo edit: warning: the instruction has {count} words; the policy reads only "
            f"the first {tokenizer.max_words}",
            file=sys.stderr,
        )


def side_limit(policy) -> int:
    """The largest side `edit` takes for `policy`: the limit it declares (`max_edit_side`;
    the tiny editor's attention cost makes larger edits take hours), else the data's
    MAX_RESOLUTION (a backbone trained at 1024 px edits at 1024 px)."""
    from lit_grpo.datamodules.shapeworld import MAX_RESOLUTION

    return policy.max_edit_side or MAX_RESOLUTION


def _check_size(size: tuple[int, int], what: str, limit: int) -> None:
    if max(size) > limit:
        from lit_grpo.datamodules.shapeworld import MAX_RESOLUTION

        why = (
            " (the largest resolution lit_grpo's data takes)"
            if limit == MAX_RESOLUTION
            else ", as the editor's cost grows steeply with the side (its `max_edit_side`)"
        )
        raise ConfigError(
            f"cannot edit at {size[1]}x{size[0]} px ({what}): edit's limit is {limit} px a "
            f"side{why}; pass --size {limit} or smaller"
        )


def _parse_device(name: str | None):
    """The torch device to edit on; a name torch does not know, or a GPU that is not here,
    is refused before the policy is loaded."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    available = {"cpu": True, "cuda": torch.cuda.is_available()}
    if torch.backends.mps.is_available():
        available["mps"] = True
    if device is None or device.type not in available:
        raise ConfigError(
            f"--device {name!r} is not a device edit can use; choose one of "
            f"{', '.join(k for k, ok in available.items() if ok)}"
        )
    if not available[device.type]:
        raise ConfigError(f"--device {name!r}: no {device.type} device is available here; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
        )
    return device


def _parse_size(text: str, parser: argparse.ArgumentParser) -> tuple[int, int]:
    """'N' or 'WxH' -> (H, W)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        parser.error(f"--size takes N or WxH in pixels, got {text!r}")
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[1], parts[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
