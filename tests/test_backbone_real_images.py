"""The diffusers backbones on real images: the pipelines' preferred sizes (edits mapped back
to the source's size), the text cache keyed by the batch's `source_path` (no read of the
pixels), pinned non-blocking copies of cached embeddings, and host syncs counted in the
sample, score and update phases of a GRPO step on the tiny Flux and Qwen models."""

import traceback
from types import SimpleNamespace

import pytest
import torch
from helpers import Brightness, quiet_trainer, tiny_data
from test_backbones import (
    BACKBONES,
    SIZE,
    flux_policy,
    qwen_policy,
    scenes,
    tiny_qwen_parts,
    tiny_rcgrpo,
)
from test_jsonl_data import shapeworld_rows, write_jsonl
from test_throughput import EverywhereSegmenter, SyncCounter

from lit_grpo.datamodules import JsonlDataModule
from lit_grpo.modules import GRPOModule
from lit_grpo.policies import LoraSettings, QwenImageEditPolicy
from lit_grpo.policies.base import resize_images
from lit_grpo.policies.diffusers_common import TextEmbedding, WordEmbedder
from lit_grpo.sampling.rollout import RolloutSampler
from lit_grpo.sampling.strategies import FullTrajectory

# --- the pipelines' preferred sizes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "kontext", "qwen"),
    [
        ((512, 512), (1024, 1024), (1024, 1024)),
        ((480, 640), (880, 1184), (896, 1184)),  # 4:3 landscape
        ((640, 480), (1184, 880), (1184, 896)),
        ((1080, 1920), (752, 1392), (768, 1376)),  # 16:9
        ((1568, 672), (1568, 672), (1568, 672)),  # one of Kontext's own
        ((3000, 2000), (1248, 832), (1248, 832)),
    ],
)
def test_the_sizes_are_the_pipelines(image, kontext, qwen):
    """(H, W) -> the size FluxKontextPipeline (nearest aspect ratio among its preferred
    resolutions) and QwenImageEditPipeline (1024 x 1024 px at the aspect ratio, sides
    rounded to 32) edit it at; worked out by hand from the installed diffusers' rules."""
    flux, qwen_ = flux_policy(auto_resize=True), qwen_policy(auto_resize=True)
    assert flux.edit_size(image) == kontext and qwen_.edit_size(image) == qwen
    assert flux.edit_size(kontext) == kontext  # Kontext's sizes map to themselves
    assert flux_policy().edit_size(image) == image  # auto_resize off: the image's own


def small_sizes(name, flux_sizes=((32, 16), (16, 16), (16, 32))):
    """A tiny backbone with auto_resize and preferred sizes fit for tiny models: Flux's
    list replaced by `flux_sizes` (W x H); Qwen's area 32 x 32."""
    policy = BACKBONES[name](auto_resize=True)
    if name == "flux":
        policy.preferred_resolutions = list(flux_sizes)
    else:
        policy.target_area = 32 * 32
    return policy


@pytest.mark.parametrize("name", BACKBONES)
def test_sources_are_edited_at_the_preferred_size_and_edits_mapped_back(name):
    policy = small_sizes(name)
    batch = scenes()
    source = resize_images(batch["source"], (12, 20))  # a 3:5 source, sides not multiples
    edit = {"flux": (16, 32), "qwen": (32, 32)}[name]
    assert policy.edit_size((12, 20)) == edit
    f = policy.vae_scale_factor
    assert policy.latent_shape((12, 20)) == (policy.latent_channels, edit[0] // f, edit[1] // f)
    assert policy.token_grid((12, 20)) == (edit[0] // f // 2, edit[1] // f // 2)
    resized = resize_images(source, edit)
    cond = policy.encode_condition(source, batch["instruction"])
    assert torch.equal(cond.image, policy._latents(resized))  # the condition: the resized source
    assert torch.equal(policy.encode_images(source), policy._latents(resized))
    record = RolloutSampler(steps=2)(
        policy, source, list(batch["instruction"]), 2, FullTrajectory().plan(2, 0)
    )
    assert record.latents.shape[-2:] == (edit[0] // f, edit[1] // f)
    assert record.images.shape == (4, 3, 12, 20)  # at the source's size, for the rewards
    with torch.no_grad():
        back = resize_images(policy.decode(record.latents), (12, 20))
    assert torch.equal(record.images, back)
    edits = policy.edit(source, batch["instruction"], steps=2)
    assert edits.shape == (2, 3, 12, 20)
    with pytest.raises(ValueError, match="multiples of 4 .* unless auto_resize is on"):
        flux_policy().latent_shape((12, 18))


def test_a_region_grpo_step_runs_on_sources_of_another_size():
    """RC-GRPO (region noise from the source's masks, the attention reward on the token
    grid) with 16 px ShapeWorld sources, edited at 24 x 24 by the tiny Flux."""
    module = tiny_rcgrpo(small_sizes("flux", [(24, 24)]))
    batch = scenes()
    record = module.sample(batch, torch.Generator().manual_seed(0))
    assert record.images.shape == (4, 3, SIZE, SIZE)
    assert record.regions.shape == (4, 12, 12) and record.attention.shape[-2:] == (6, 6)
    assert torch.isfinite(module.score(record, batch).total).all()
    trainer = quiet_trainer(max_steps=1, max_epochs=1)
    trainer.fit(module, tiny_data(val_size=2))
    assert trainer.callback_metrics["train/skipped"].item() == 0.0


def test_the_jsonl_data_takes_any_resolution_for_a_resizing_policy(tmp_path):
    from lit_grpo.checks import ConfigError

    _, rows = shapeworld_rows(tmp_path, 2, full=False)
    path = str(write_jsonl(tmp_path / "r.jsonl", rows))
    resizing = JsonlDataModule(train=path, resolution=[10, 18])
    resizing.trainer = SimpleNamespace(lightning_module=SimpleNamespace(policy=small_sizes("flux")))
    resizing.setup("fit")
    sample = resizing.splits["train"][0]
    assert sample["source"].shape == (3, 10, 18)
    assert sample["source_path"] == str(tmp_path / "imgs/0.png")
    plain = JsonlDataModule(train=path, resolution=[10, 18])
    plain.trainer = SimpleNamespace(lightning_module=SimpleNamespace(policy=flux_policy()))
    with pytest.raises(ConfigError, match="multiple of the policy's token size 4x4"):
        plain.setup("fit")


# --- the text cache: keyed by the batch's source_path -----------------------------------------


class ImageWords(WordEmbedder):
    """A tiny embedder that reads the image (as Qwen2.5-VL does): word vectors plus the
    image's mean brightness; counts its calls."""

    uses_image = True

    def __init__(self, dim: int):
        super().__init__(dim)
        self.calls: list[int] = []

    def forward(self, instructions, images):
        self.calls.append(len(instructions))
        out = super().forward(instructions, images)
        text = out.text + images.mean((1, 2, 3))[:, None, None] * out.mask[..., None]
        return TextEmbedding(text, out.mask)


def image_qwen(**kw):
    transformer, vae = tiny_qwen_parts()
    return QwenImageEditPolicy.from_components(transformer, vae, ImageWords(16), **kw)


HOST_READS = ("cpu", "numpy", "tolist", "item", "nonzero", "__bool__", "__float__", "__int__")


def test_an_image_reading_embedder_is_cached_by_key_without_reading_the_image(monkeypatch):
    policy = image_qwen(true_cfg=1.0)
    embedder = policy.text.embedder
    batch = scenes()
    images, prompts, keys = batch["source"], list(batch["instruction"]), ["a.png", "b.png"]
    first = policy.embed_text(prompts, images, keys)
    assert embedder.calls == [2]

    def read(*args, **kwargs):
        raise AssertionError("a host read")

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, read)
        again = policy.embed_text(prompts[::-1], images.flip(0), keys[::-1])
    assert embedder.calls == [2] and torch.equal(again.text, first.text.flip(0))
    # the key is trusted: the same key with other pixels is the cached entry
    assert torch.equal(policy.embed_text(prompts, 1 - images, keys).text, first.text)
    # another size is another entry (a data module of another resolution)
    small = resize_images(images, (8, 8))
    policy.embed_text(prompts, small, keys)
    assert embedder.calls == [2, 2] and len(policy.text.entries) == 4
    # no keys: embedded on every call, the image read each time, nothing kept
    plain = [policy.embed_text(prompts, 1 - images).text for _ in range(2)]
    assert embedder.calls == [2, 2, 2, 2] and len(policy.text.entries) == 4
    assert not torch.allclose(plain[0], first.text) and torch.equal(plain[0], plain[1])
    # an embedder that does not read the image keys by instruction alone
    words = qwen_policy()
    words.embed_text(prompts, images)
    assert set(words.text.entries) == set(prompts)


def test_cached_rows_are_copied_without_blocking_and_pinned_for_cuda(monkeypatch):
    """On the CPU: the stacked rows are copied to the device with `non_blocking=True`, each
    tensor of them, and stacked in pinned memory exactly when the device is a GPU (pinning
    needs one: test_cached_embeddings_copy_without_a_cuda_sync checks it there)."""
    from lit_grpo.policies import diffusers_common

    policy = flux_policy()
    batch = scenes()
    policy.embed_text(batch["instruction"], batch["source"])  # cached
    pins, copies, tensors = [], [], []
    stack = diffusers_common.stack_embeddings
    monkeypatch.setattr(
        diffusers_common,
        "stack_embeddings",
        lambda rows, **kw: pins.append(kw["pin"]) or stack(rows, **{**kw, "pin": False}),
    )
    move = TextEmbedding.to
    monkeypatch.setattr(
        TextEmbedding,
        "to",
        lambda e, device, **kw: copies.append((device, kw)) or move(e, device, **kw),
    )
    emb = policy.embed_text(batch["instruction"], batch["source"])
    assert pins == [False] and copies == [(torch.device("cpu"), {"non_blocking": True})]
    assert emb.text.dtype == policy.latent_dtype and emb.pooled.shape == (2, 32)
    to = torch.Tensor.to
    monkeypatch.setattr(
        torch.Tensor, "to", lambda t, *a, **kw: tensors.append(kw) or to(t, *a, **kw)
    )
    emb.to("cpu", non_blocking=True)
    assert tensors == [{"non_blocking": True}] * 3  # text, mask, pooled


@pytest.mark.gpu
def test_cached_embeddings_copy_without_a_cuda_sync():
    from lit_grpo.policies.diffusers_common import stack_embeddings

    policy = flux_policy().cuda()
    batch = scenes()
    source = batch["source"].cuda()
    want = policy.embed_text(batch["instruction"], source)  # the miss reads back: a sync
    rows = policy.text(list(batch["instruction"]), source)
    assert all(t.is_pinned() for t in vars(stack_embeddings(rows, pin=True)).values())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = policy.embed_text(batch["instruction"], source)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got.text, want.text) and got.text.device.type == "cuda"


def test_a_grpo_run_on_jsonl_rows_embeds_each_row_once(tmp_path):
    """The batch's `source_path` reaches the policy: over 2 steps of 2 rows (one epoch
    each), the image-reading embedder runs on step 1 only."""
    _, rows = shapeworld_rows(tmp_path, 2, tasks=("translate",), full=False)
    path = str(write_jsonl(tmp_path / "train.jsonl", rows))
    data = JsonlDataModule(train=path, resolution=SIZE, batch_size=2)
    policy = image_qwen(true_cfg=2.0)  # the negative prompt reads the image too
    module = GRPOModule(
        policy,
        [Brightness()],
        lora=LoraSettings(rank=2, alpha=2),
        group_size=2,
        sample_steps=2,
        eval_steps=2,
    )
    seen = []
    encode = policy.encode_condition
    policy.encode_condition = lambda s, i, keys=None: seen.append(keys) or encode(s, i, keys)
    quiet_trainer(max_steps=2, max_epochs=2).fit(module, data)
    paths = sorted(str(tmp_path / f"imgs/{i}.png") for i in range(2))
    # the memory check's one condition, then the 2 steps' sampling
    assert len(seen) == 3 and seen[0][0] in paths
    assert all(sorted(keys) == paths for keys in seen[1:])
    # instruction then negative prompt: of the check's row, of step 1's other row; none after
    assert policy.text.embedder.calls == [1, 1, 1, 1]
    assert len(policy.text.entries) == 4


# --- host syncs in one GRPO step on the diffusers path ----------------------------------------


class PhaseSyncs(SyncCounter):
    """`SyncCounter` recording, for every sync, the phase it ran in (1-based over the run)
    and its stack."""

    def __init__(self, monkeypatch):
        super().__init__(monkeypatch)
        self.seen: list[tuple[int, str]] = []

    def _record(self, what: str) -> None:
        if self.active:
            stack = "".join(traceback.format_stack(limit=12)[:-2])
            self.seen.append((len(self.phases), f"{what}\n{stack}"))


@pytest.mark.parametrize("name", BACKBONES)
def test_host_syncs_in_a_grpo_step_of_a_backbone(name, monkeypatch):
    """Sampling (text, VAE encode, velocity, SDE, VAE decode and the map back), the rewards
    (a device-side reward and segmenter) and the update, after step 1's sampling (which
    embeds the 2 instructions of the training set; cached from then on): none at all, for
    both. (Qwen: diffusers 0.42's `QwenImageTransformer2DModel.forward` would make one per
    transformer call, in `compute_text_seq_len_from_mask`, for text lengths it discards;
    `policies/qwen_text_length.py` leaves it out.) Step 1's sampling: only the cache's
    read-back of the texts it embeds."""
    policy = small_sizes(name, [(24, 24)])  # 16 px sources edited at 24 (Flux) or 32 (Qwen)
    module = GRPOModule(
        policy,
        [Brightness()],
        lora=LoraSettings(rank=2, alpha=2),
        group_size=2,
        sample_steps=3,
        eval_steps=2,
        segmenter=EverywhereSegmenter(),
        micro_batch_size=3,
    )
    counter = PhaseSyncs(monkeypatch)
    forwards = []
    policy.transformer.register_forward_pre_hook(
        lambda *_: forwards.append(len(counter.phases)) if counter.active else None
    )
    trainer = quiet_trainer(max_steps=2, max_epochs=2, callbacks=[counter])
    trainer.fit(module, tiny_data(train_size=2, val_size=2))
    assert counter.phases == ["sampling", "rewards", "update"] * 2
    later = [stack for phase, stack in counter.seen if phase > 1]
    assert [p for p in forwards if p > 1]  # the transformer ran in the counted steps
    assert later == [], f"{len(later)} host syncs after step 1's sampling:\n{later[0]}"
    first = [stack for phase, stack in counter.seen if phase == 1]
    assert first and all("in _rows" in stack for stack in first), first[0]
