"""The diffusers backbones' files: LoRA export that diffusers' pipelines load, loading from
local folders (and naming what is missing), and the config overlays."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_backbones import BACKBONES, SIZE, quiet_fit, scenes, tiny_flux_parts

from lit_grpo.__main__ import main
from lit_grpo.callbacks import LoraExporter
from lit_grpo.modules import SFTModule
from lit_grpo.policies import FluxKontextPolicy, LoraSettings, QwenImageEditPolicy
from lit_grpo.policies.diffusers_common import WordEmbedder
from lit_grpo.policies.diffusers_folder import ModelFilesError
from lit_grpo.policies.lora import save_diffusers_lora

# --- LoRA export: what diffusers' pipelines load ---------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_exported_lora_loads_into_the_diffusers_pipeline_and_gives_the_policy_output(
    name, tmp_path
):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        QwenImageEditPipeline,
    )

    policy = BACKBONES[name]()
    base = copy.deepcopy(policy.transformer)
    module = SFTModule(policy, lora=LoraSettings(rank=4, alpha=8), lr=5e-2, warmup_steps=1)
    exporter = LoraExporter(dirpath=str(tmp_path / "lora"), diffusers_prefix="transformer")
    quiet_fit(module, steps=2, callbacks=[exporter], root=tmp_path)  # one epoch: one checkpoint
    (from_callback,) = (tmp_path / "lora").glob("*.safetensors")
    path = tmp_path / "lora.safetensors"
    save_diffusers_lora(policy.transformer, path)
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    from_command = tmp_path / "command.safetensors"
    assert main(["export", str(ckpt), str(from_command), "--lora-diffusers"]) == 0
    written = load_file(path)
    for other in (from_callback, from_command):  # three writers, one file
        assert load_file(other).keys() == written.keys()
        assert all(torch.equal(load_file(other)[k], v) for k, v in written.items())

    if name == "flux":
        pipe = FluxKontextPipeline(
            FlowMatchEulerDiscreteScheduler(), policy.vae, None, None, None, None, base
        )
    else:
        pipe = QwenImageEditPipeline(
            FlowMatchEulerDiscreteScheduler(), policy.vae, None, None, None, base
        )
    pipe.load_lora_weights(str(from_callback))
    loaded = BACKBONES[name]()
    loaded.transformer = pipe.transformer  # the pipeline's transformer, adapter from the file

    batch = scenes()
    with policy.reference():
        (reference,) = velocities([policy], batch["source"], batch["instruction"])
    ours, theirs = velocities([policy, loaded], batch["source"], batch["instruction"])
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours - reference).abs().max() > 1e-4  # the file carries the trained adapter


def velocities(policies, images, instructions) -> list[torch.Tensor]:
    """Each policy's velocity [N, C, h, w] at the same seeded latents and sigmas, on the
    condition the first policy encodes from `images` [N, 3, H, W] and `instructions`."""
    cond = policies[0].encode_condition(images, list(instructions))
    n = images.shape[0]
    shape = policies[0].latent_shape(tuple(images.shape[-2:]))
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.linspace(0.4, 0.6, n)
    with torch.no_grad():
        return [p.velocity(x, sigma, cond) for p in policies]


# --- loading from a local folder -------------------------------------------------------------


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelFilesError, match="pretrained folder not found"):
        FluxKontextPolicy(pretrained=str(tmp_path / "nowhere"))


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """A complete tiny Kontext folder, its transformer's weights in 3 shards and an index."""
    root = tmp_path_factory.mktemp("flux")
    save_flux_folder(root)
    transformer, _ = tiny_flux_parts()
    for f in (root / "transformer").iterdir():
        f.unlink()
    transformer.save_pretrained(root / "transformer", max_shard_size="150KB")
    return root


def half_present(folder, tmp_path, *remove):
    """A copy of `folder` without the files or sub-folders `remove` (paths inside it)."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    for rel in remove:
        target = copy / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return copy


def refusal(folder) -> str:
    with pytest.raises(ModelFilesError) as err:
        FluxKontextPolicy(pretrained=str(folder), dtype="float32", auto_resize=False)
    return str(err.value)


SHARDS = "diffusion_pytorch_model-0000{}-of-00003.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def test_a_complete_folder_with_sharded_weights_loads(flux_folder):
    assert sorted(f.name for f in (flux_folder / "transformer").glob("*.safetensors")) == [
        SHARDS.format(i) for i in (1, 2, 3)
    ]
    policy = FluxKontextPolicy(pretrained=str(flux_folder), dtype="float32", auto_resize=False)
    saved, _ = tiny_flux_parts()
    assert all(
        torch.equal(a, b) for a, b in zip(saved.parameters(), policy.transformer.parameters())
    )


@pytest.mark.parametrize(
    ("remove", "missing"),
    [
        (["vae"], "vae/ (AutoencoderKL)"),  # the transformer but no VAE
        (["tokenizer_2"], "tokenizer_2/ (T5's tokenizer)"),
        (
            ["tokenizer/merges.txt"],
            "tokenizer/vocab.json and tokenizer/merges.txt (CLIP's tokenizer)",
        ),
        (
            ["tokenizer_2/tokenizer.json"],
            "tokenizer_2/tokenizer.json or tokenizer_2/spiece.model (T5's tokenizer)",
        ),
        (["text_encoder/config.json"], "text_encoder/config.json (CLIP's text model)"),
        (
            ["text_encoder_2/model.safetensors"],
            "text_encoder_2/model.safetensors or a sharded model.safetensors.index.json "
            "(T5's encoder's weights)",
        ),
        (  # an interrupted download: the index lists a shard that is not there
            [f"transformer/{SHARDS.format(2)}"],
            f"transformer/{SHARDS.format(2)} (listed in transformer/{INDEX})",
        ),
    ],
    ids=["no-vae", "no-t5-tokenizer", "clip-tokenizer-half", "t5-tokenizer-empty",
         "no-clip-config", "no-t5-weights", "missing-shard"],
)  # fmt: skip
def test_a_half_present_folder_is_one_error_naming_what_is_missing(
    flux_folder, tmp_path, remove, missing
):
    folder = half_present(flux_folder, tmp_path, *remove)
    assert refusal(folder) == (
        f"FluxKontextPolicy: {folder} is not a complete diffusers folder of this model; "
        f"missing {missing}. docs/backbones.md lists the files it needs"
    )


def test_every_missing_part_is_named_in_the_same_line(flux_folder, tmp_path):
    folder = half_present(flux_folder, tmp_path, "vae", f"transformer/{SHARDS.format(3)}")
    (folder / "transformer" / INDEX).write_text("{not json")
    message = refusal(folder)
    assert "\n" not in message
    assert message.startswith(f"FluxKontextPolicy: {folder} is not a complete diffusers folder")
    assert f"missing a readable transformer/{INDEX} (JSONDecodeError: " in message
    assert message.endswith("; vae/ (AutoencoderKL). docs/backbones.md lists the files it needs")


def test_qwen_names_its_own_parts(flux_folder, tmp_path):
    gone = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    folder = half_present(flux_folder, tmp_path, *gone)
    (folder / "vae").mkdir()  # an empty VAE folder: its config and weights are named
    with pytest.raises(ModelFilesError) as err:
        QwenImageEditPolicy(pretrained=str(folder))
    assert str(err.value) == (
        f"QwenImageEditPolicy: {folder} is not a complete diffusers folder of this model; "
        "missing vae/config.json (AutoencoderKLQwenImage); vae/diffusion_pytorch_model."
        "safetensors or a sharded diffusion_pytorch_model.safetensors.index.json "
        "(AutoencoderKLQwenImage's weights); text_encoder/ (Qwen2.5-VL); processor/ "
        "(Qwen2.5-VL's processor). docs/backbones.md lists the files it needs"
    )


def test_the_cli_refuses_a_half_present_folder_in_one_line(flux_folder, tmp_path, capsys):
    folder = half_present(flux_folder, tmp_path, "vae")
    overlay = OVERLAYS[0]
    sft = str(overlay.parent.parent / "sft.yaml")
    pretrained = f"--model.init_args.policy.init_args.pretrained={folder}"
    capsys.readouterr()
    assert main(["fit", "--config", sft, "--config", str(overlay), pretrained]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"FluxKontextPolicy: {folder} is not a complete diffusers folder of this model; "
        "missing vae/ (AutoencoderKL). docs/backbones.md lists the files it needs"
    ), lines


def test_a_lora_target_that_names_no_module_is_refused():
    from lit_grpo.checks import ConfigError

    policy = FluxKontextPolicy.from_components(*tiny_flux_parts(), WordEmbedder(32, 32))
    with pytest.raises(ConfigError) as err:
        policy.add_lora(
            LoraSettings(rank=2, alpha=2, target_modules=["to_q", "to_qq", "attn.to_z"])
        )
    message = str(err.value)
    assert message.startswith(
        "lora.target_modules: ['to_qq', 'attn.to_z'] name no module of FluxTransformer2DModel"
    )
    assert "'to_q'" in message.split("linear layers end in")[1]  # what there is
    assert not policy.has_lora
    # the defaults of both backbones name modules of their transformers
    for name in BACKBONES:
        other = BACKBONES[name]()
        other.add_lora(LoraSettings(rank=2, alpha=2))
        wrapped = {n for n, m in other.transformer.named_modules() if hasattr(m, "lora_A")}
        assert all(any(n.endswith(t) for n in wrapped) for t in other.lora_targets)


def save_flux_folder(root):
    """A Kontext folder of tiny parts: transformer, VAE, and a random CLIP and T5 with
    hand-made word vocabularies."""
    transformer, vae = tiny_flux_parts()
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    save_tiny_text_encoders(root)
    return transformer


def save_tiny_text_encoders(root):
    import json

    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    words = "move the red blue square circle left right".split()
    (root / "tokenizer").mkdir()
    vocab = {
        "<|startoftext|>": 0,
        "<|endoftext|>": 1,
        **{f"{w}</w>": i + 2 for i, w in enumerate(words)},
    }
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    clip_tok = CLIPTokenizer(
        str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt")
    )
    clip_tok.model_max_length = 16
    clip_tok.save_pretrained(root / "tokenizer")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    T5TokenizerFast(vocab=pieces, extra_ids=0).save_pretrained(root / "tokenizer_2")
    torch.manual_seed(0)
    clip = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=1,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(clip).save_pretrained(root / "text_encoder")
    t5 = T5Config(vocab_size=len(pieces), d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4)
    T5EncoderModel(t5).save_pretrained(root / "text_encoder_2")


def test_flux_loads_transformer_and_vae_from_a_local_folder(tmp_path):
    saved = save_flux_folder(tmp_path)
    policy = FluxKontextPolicy(
        pretrained=str(tmp_path), dtype="float32", guidance=2.0, auto_resize=False
    )
    assert policy.text.embedder.models is None  # the text encoders load on first use
    assert all(
        torch.equal(a, b) for a, b in zip(saved.parameters(), policy.transformer.parameters())
    )
    assert policy.config == {
        "pretrained": str(tmp_path),
        "dtype": "float32",
        "guidance": 2.0,
        "max_sequence_length": 512,
        "auto_resize": False,
    }
    bf16 = FluxKontextPolicy(pretrained=str(tmp_path), auto_resize=False)
    assert bf16.latent_dtype == torch.bfloat16
    bf16.add_lora(LoraSettings(rank=2, alpha=2))
    lora = [p for n, p in bf16.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    x = torch.randn(1, *bf16.latent_shape((SIZE, SIZE)))
    cond = FluxKontextPolicy.from_components(
        bf16.transformer, bf16.vae, WordEmbedder(32, 32)
    ).encode_condition(scenes(1)["source"], ["move the red square left"])
    assert bf16.velocity(x, torch.tensor([0.5]), cond).dtype == torch.bfloat16
    for weights in (tmp_path / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")  # there, but unreadable
    with pytest.raises(ModelFilesError, match="could not load FluxTransformer2DModel"):
        FluxKontextPolicy(pretrained=str(tmp_path))


def test_flux_text_encoders_load_from_the_folder_on_first_use(tmp_path):
    save_flux_folder(tmp_path)
    policy = FluxKontextPolicy(
        str(tmp_path), dtype="float32", max_sequence_length=8, auto_resize=False
    )
    encoders = policy.text.embedder
    assert encoders.models is None
    images = scenes()["source"]
    cond = policy.encode_condition(images, ["move the red square left", "move the blue circle"])
    assert encoders.models is not None
    assert cond.text.shape == (2, 8, 32) and cond.pooled.shape == (2, 32)
    # padding is attended (as the pipeline does) but marked: 5 words + </s>, 4 words + </s>
    assert cond.text_mask.sum(1).tolist() == [6, 5]
    v = policy.velocity(torch.randn(2, *policy.latent_shape((SIZE, SIZE))), torch.rand(2), cond)
    assert v.shape == (2, 2, 8, 8) and torch.isfinite(v).all()
    again = policy.encode_condition(images, ["move the blue circle", "move the red square left"])
    assert torch.equal(again.text, cond.text.flip(0))  # from the cache, row for row


# --- the config overlays ---------------------------------------------------------------------

OVERLAYS = sorted((Path(__file__).resolve().parent.parent / "configs/backbones").glob("*.yaml"))
METHODS = ["sft.yaml", "talk2move.yaml"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_backbone_overlays_parse_over_method_configs(overlay, method, capsys):
    from lit_grpo.cli import run_cli

    config = str(overlay.parent.parent / method)
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", config, "--config", str(overlay), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    policy = "FluxKontextPolicy" if "flux" in overlay.name else "QwenImageEditPolicy"
    assert f"class_path: lit_grpo.policies.{policy}" in printed
    assert "rank: 64" in printed and "lr: 0.0001" in printed and "weights: null" in printed


ROOT = Path(__file__).resolve().parent.parent
JSONL = ROOT / "configs/data/jsonl.yaml"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_the_main_job_on_photos_prints_a_readable_config(overlay, capsys):
    """`fit --config configs/spatialflow.yaml --config <backbone> --config
    configs/data/jsonl.yaml --print_config`: the composed config, every value plain (no
    interpolation left, no Python object tags, no long lines), the overlays' values in it."""
    import yaml

    from lit_grpo.cli import run_cli

    configs = [ROOT / "configs/spatialflow.yaml", overlay, JSONL]
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", *(a for c in configs for a in ("--config", str(c))), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert len(lines) < 300 and max(len(line) for line in lines) <= 100
    assert "${" not in printed and "!!" not in printed and "<" not in printed
    config = yaml.safe_load(printed)
    model, data = config["model"], config["data"]
    assert model["class_path"] == "lit_grpo.modules.SpatialFlowGRPOModule"
    written = yaml.safe_load(overlay.read_text())["model"]["init_args"]
    assert model["init_args"]["policy"] == written["policy"]  # every argument, as written
    assert model["init_args"]["lora"]["rank"] == 64 and model["init_args"]["lr"] == 1e-4
    assert model["init_args"]["segmenter"]["class_path"] == "lit_grpo.perception.SamClipSegmenter"
    assert data["class_path"] == "lit_grpo.datamodules.JsonlDataModule"
    assert data["init_args"]["resolution"] == 1024 and data["init_args"]["train"] == (
        "data/train.jsonl"
    )


@pytest.mark.parametrize("path", [*OVERLAYS, JSONL], ids=lambda p: p.name)
def test_every_value_in_the_overlays_says_what_it_does(path):
    """Each line that sets a value (not a `class_path`) carries a comment."""
    import re

    bare = [
        line
        for line in path.read_text().splitlines()
        if re.match(r"\s*[\w.]+: *[^\s#]", line)
        and not line.strip().startswith("class_path:")
        and "#" not in line
    ]
    assert bare == []


def test_an_overlay_without_local_weights_is_refused_in_one_line(in_tmp, capsys):
    capsys.readouterr()
    overlay = OVERLAYS[0]  # both policies check their folder with the same code
    sft = str(overlay.parent.parent / "sft.yaml")
    assert main(["fit", "--config", sft, "--config", str(overlay)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "FluxKontextPolicy: pretrained folder not found: /models/FLUX.1-Kontext-dev" in lines[0]


def test_importing_the_policies_does_not_import_diffusers():
    import subprocess
    import sys

    code = (
        "import sys, lit_grpo.policies; "
        "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
