"""The main job on a user's own photos and backbone, end to end, through the commands a user
types (docs/backbones.md, "From a folder of photos and the Kontext weights to a LoRA in
diffusers"), on both backbones:

1. `expand --images tests/data/photos --objects ...` -> data/train.jsonl, data/val.jsonl and
   the found masks;
2. `fit --config configs/spatialflow.yaml --config configs/backbones/<backbone>.yaml
   --config configs/data/jsonl.yaml` with only the overrides a tiny CPU run needs;
3. `test` and `edit` on the checkpoint it wrote;
4. `export --lora-diffusers`, loaded into diffusers' own pipeline read from the same folder.

The photos are real (tests/data/README.md); every model is tiny and random, written to local
files as a user's would be: the backbone's diffusers folder (transformer, VAE, text encoders
and tokenizers, plus the `model_index.json` and `scheduler/` a Hub snapshot holds), SAM's
`.pth` (a 79k-parameter SAM stands in for vit_b) and open_clip's weights and config.

Finding the objects: a random SAM and CLIP know no object, so the CLIP scores of the named
objects are noise around 0. `expand` runs with `--threshold -1` (every cosine similarity
reaches it): each named object is "found" in every photo where SAM proposes a mask, its best
CLIP-scored mask. The segmenter inside the run (`RegionReward`, the metrics) takes the same
threshold, so that rewards are scores rather than misses. Which mask wins is arbitrary; what
is checked is that the rows, masks and boxes are what the commands say they are. With only
four photos, data/val.jsonl is expanded from the same photos with another `--seed` (another
phrasing per sample); a user keeps validation photos apart (docs/backbones.md).

Each case takes about 40-60 s on one CPU thread: most of it is SAM and CLIP scoring every
edit (the region reward, the metrics) and MLflow's sqlite store being created.
"""

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_clip, tiny_sam
from PIL import Image
from test_backbone_files import save_flux_folder, velocities
from test_qwen_text import save_qwen_folder

from lit_grpo.__main__ import main
from lit_grpo.checks import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "data" / "photos"
OBJECTS = ["cup", "cat"]
SIZE = (64, 96)  # H x W: the photos' own size (three of four), a multiple of 16 px
BACKBONES = {
    "flux": ("flux_kontext.yaml", "FluxKontextPolicy", "FluxKontextPipeline"),
    "qwen": ("qwen_image_edit.yaml", "QwenImageEditPolicy", "QwenImageEditPipeline"),
}


def hub_folder(name: str, root: Path) -> Path:
    """A tiny diffusers folder of the backbone laid out as a Hub snapshot: the policy's files
    (test_backbone_files / test_qwen_text) plus what diffusers' pipeline reads besides:
    `scheduler/`, `model_index.json` and (Qwen) `tokenizer/`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = root / name
    folder.mkdir(parents=True)
    FlowMatchEulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    parts = {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    if name == "flux":
        save_flux_folder(folder)
        parts |= {
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        }
        pipeline = "FluxKontextPipeline"
    else:
        from transformers import AutoProcessor

        save_qwen_folder(folder)
        AutoProcessor.from_pretrained(folder / "processor").tokenizer.save_pretrained(
            folder / "tokenizer"
        )
        parts |= {
            "transformer": ["diffusers", "QwenImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "processor": ["transformers", "Qwen2VLProcessor"],
        }
        pipeline = "QwenImageEditPipeline"
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.0", **parts}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def weights(in_tmp, monkeypatch):
    """The segmenter's local files: (SAM .pth, open_clip weights, open_clip config)."""
    import segment_anything

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", tiny_sam)
    (in_tmp / "weights").mkdir()
    torch.save(tiny_sam().state_dict(), in_tmp / "weights" / "sam.pth")
    config, clip, _ = save_tiny_clip(in_tmp / "weights")
    return str(in_tmp / "weights" / "sam.pth"), clip, config


def run(capsys, *argv) -> tuple[str, str]:
    """`python -m lit_grpo ARGV` in this process: (stdout, stderr); a failure shows both."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, f"{argv[0]} exited {code}:\n{out}\n{err}"
    return out, err


def only(paths):
    """The single path of an iterable of them (a list shows in the failure otherwise)."""
    paths = sorted(paths)
    assert len(paths) == 1, paths
    return paths[0]


@pytest.mark.parametrize("name", BACKBONES)
def test_the_main_job_runs_on_photos_from_expand_to_diffusers(name, in_tmp, weights, capsys):
    overlay, policy_class, pipeline_class = BACKBONES[name]
    sam, clip, clip_config = weights
    folder = hub_folder(name, in_tmp / "models")
    seconds = {}

    # 1. expand: every named object in every photo (threshold -1, module docstring)
    start = time.perf_counter()
    find = ["--images", str(PHOTOS), "--objects", ",".join(OBJECTS), "--sam", sam]
    find += ["--clip", clip, "--clip-model", clip_config, "--threshold", "-1"]
    photos = sorted(p.name for p in PHOTOS.iterdir() if not p.name.endswith(".md"))
    for split, seed in (("train", 0), ("val", 1)):
        out, err = run(
            capsys, "expand", *find, "--tasks", "translate", "rotate", "scale", "--seed", str(seed),
            "--out", f"data/{split}.jsonl",
        )  # fmt: skip
        rows = [json.loads(line) for line in Path(f"data/{split}.jsonl").read_text().splitlines()]
        found = {(Path(r["image"]).name, r["object"]) for r in rows}
        assert f"wrote {len(rows)} samples ({len(found)} annotations x 3 task(s) x 4)" in out
        # a pair not found (the tiny SAM proposes no mask in some photo) is named, not a row
        missed = {(p, o) for p in photos for o in OBJECTS} - found
        assert len({p for p, _ in found}) >= 2 and err.count("not found (") == len(missed)
        for photo, obj in missed:
            assert f"{PHOTOS / photo}: {obj!r} not found (" in err
    assert all(Path("data", r["image"]).resolve().parent == PHOTOS for r in rows)
    for row in rows:
        with Image.open(Path("data") / row["image"]) as photo:
            mask = np.asarray(Image.open(Path("data") / row["mask"])) > 0
            assert mask.shape == (photo.height, photo.width) and mask.any()
        ys, xs = np.nonzero(mask)
        assert row["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    seconds["expand"] = time.perf_counter() - start

    # 2. fit: the three shipped configs, and what a tiny CPU run needs
    policy = "--model.init_args.policy.init_args."
    segmenter = "--model.init_args.segmenter.init_args."
    configs = ["--config", str(ROOT / "configs/spatialflow.yaml")]
    configs += ["--config", str(ROOT / "configs/backbones" / overlay)]
    configs += ["--config", str(ROOT / "configs/data/jsonl.yaml")]
    tiny = [
        f"{policy}pretrained={folder}",
        f"{policy}dtype=float32",
        f"{policy}auto_resize=false",  # edit at SIZE, not at ~1 MP
        f"{policy}gradient_checkpointing=false",
        f"{segmenter}sam_checkpoint={sam}",
        f"{segmenter}clip_checkpoint={clip}",
        f"{segmenter}clip_model={clip_config}",
        f"{segmenter}threshold=-1",
        f"{segmenter}points_per_side=4",  # 16 SAM prompts per image, not 256
        "--model.init_args.lora={rank: 2, alpha: 2}",
        "--model.init_args.lr=0.01",  # 2 steps move the adapter measurably
        "--model.init_args.group_size=2",
        "--model.init_args.sample_steps=2",
        "--model.init_args.eval_steps=2",
        "--model.init_args.strategy.init_args.exit_step=1",
        f"--data.init_args.resolution=[{SIZE[0]}, {SIZE[1]}]",
    ]
    if name == "flux":
        tiny.append(f"{policy}max_sequence_length=16")  # T5 tokens (the pipeline's 512)
    else:
        tiny.append(f"{policy}true_cfg=1.0")  # one transformer pass per velocity, not two
    trainer = ["--trainer.max_steps=2", "--trainer.val_check_interval=2"]
    trainer += ["--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0"]
    start = time.perf_counter()
    run(capsys, "fit", *configs, *tiny, *trainer)
    seconds["fit"] = time.perf_counter() - start
    ckpt = only(Path("runs").glob("*/*/checkpoints/last.ckpt"))
    best = [p for p in ckpt.parent.glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(best) == 1 and "step=2" in best[0].name  # the validated step's, by val/reward
    saved = read_checkpoint(ckpt, "checkpoint")  # weights_only, as every command reads it
    entry = saved["lit_grpo_policy"]
    assert entry["class"] == policy_class and entry["config"]["pretrained"] == str(folder)
    assert saved["global_step"] == 2
    assert all("lora_" in k for k in saved["state_dict"] if k.startswith("policy.transformer."))
    assert (ckpt.parent / "lora" / "lora-step=000002.safetensors").is_file()  # LoraExporter's

    # 3. test on the validation rows (one batch), and one edit of a photo
    start = time.perf_counter()
    test = ["--ckpt_path", str(ckpt), "--data.init_args.test=data/val.jsonl"]
    out, _ = run(capsys, "test", *configs, *tiny, *test, "--trainer.limit_test_batches=1")
    metrics = {}  # Lightning's table of test metrics: | test/name | value |
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("\u2502")[1:-1]]
        if len(cells) == 2 and cells[0].startswith("test/"):
            metrics[cells[0]] = float(cells[1])
    expected = {"test/reward", "test/region_edit", "test/object_found", "test/background_l1"}
    assert expected | {"test/translate/accuracy"} <= metrics.keys(), out
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert "Talk2Move table: 2 test edits, 2 ODE steps" in out  # one batch of 2 rows
    seconds["test"] = time.perf_counter() - start

    start = time.perf_counter()
    edited = in_tmp / "edits" / "coffee.png"
    out, _ = run(
        capsys, "edit", "--ckpt", str(ckpt), "--image", str(PHOTOS / "coffee.png"),
        "--instruction", "move the cup to the left", "--steps", "2", "--out", str(edited),
    )  # fmt: skip
    assert out.startswith(f"policy  {policy_class} (")
    assert f"wrote   {edited} (96x64 px)" in out
    with Image.open(edited) as image, Image.open(PHOTOS / "coffee.png") as photo:
        assert image.size == photo.size == (96, 64)  # the photo's size: trained at it
        assert np.abs(np.asarray(image, float) - np.asarray(photo.convert("RGB"), float)).mean() > 1
    # a backbone is not held to the tiny editor's 512 px: its own size rule answers
    capsys.readouterr()
    edit = ["edit", "--ckpt", str(ckpt), "--image", str(PHOTOS / "coffee.png")]
    edit += ["--instruction", "move the cup to the left", "--size", "1030"]
    assert main([*edit, "--out", str(in_tmp / "edits" / "big.png")]) == 2
    err = capsys.readouterr().err
    assert f"error: {policy_class} cannot edit a 1030x1030 px image: " in err, err
    # a mask (the left half editable) reaches the backbone's blended sampler
    # (test_backbones.py checks the latents it keeps)
    mask = in_tmp / "edits" / "mask.png"
    half = np.zeros((64, 96), np.uint8)
    half[:, :48] = 255
    Image.fromarray(half).save(mask)
    edit[-2:] = ["--steps", "2", "--mask", str(mask)]
    assert main([*edit, "--out", str(in_tmp / "edits" / "masked.png")]) == 0
    assert f"mask    {mask}: 50% of the image may change" in capsys.readouterr().out
    seconds["edit"] = time.perf_counter() - start

    # 4. export the adapter; diffusers' pipeline, read from the folder, loads it
    start = time.perf_counter()
    lora = in_tmp / "lora.safetensors"
    out, _ = run(capsys, "export", str(ckpt), str(lora), "--lora-diffusers")
    assert out.startswith("wrote the LoRA adapter (") and "rank 2" in out
    check_pipeline(pipeline_class, folder, ckpt, lora)
    seconds["export"] = time.perf_counter() - start
    print(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))


def check_pipeline(pipeline_class: str, folder: Path, ckpt: Path, lora: Path) -> None:
    """diffusers' pipeline from the folder, `load_lora_weights(lora)`: its transformer gives
    the trained policy's velocity (`load_policy(ckpt)`: the folder's weights, the adapter
    merged), and the base transformer does not."""
    import diffusers

    from lit_grpo.policies.weights import load_policy

    pipe = getattr(diffusers, pipeline_class).from_pretrained(folder, torch_dtype=torch.float32)
    base = copy.deepcopy(pipe.transformer)
    pipe.load_lora_weights(str(lora))
    trained, from_pipe, untrained = (load_policy(str(ckpt)) for _ in range(3))
    from_pipe.transformer, untrained.transformer = pipe.transformer, base
    photos = torch.stack([photo_tensor(PHOTOS / p) for p in ("coffee.png", "chelsea.png")])
    ours, theirs, before = velocities(
        [trained, from_pipe, untrained], photos, ["move the cup to the left"] * 2
    )
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert (ours - before).abs().max() > 1e-4  # the file carries the trained adapter


def photo_tensor(path: Path) -> torch.Tensor:
    """[3, H, W] in [0, 1]."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)
