"""Text-driven segmentation of real images: SAM proposes masks, open_clip picks the named one.

Talk2Move locates the instructed object in the source and the edit by "text-driven
segmentation" and does not say with what. SAM v1 takes points and boxes, not text, so the
phrase is grounded the common way (our choice, not the paper's):

1. proposals: SAM's masks for a `points_per_side`^2 grid of single-point prompts (3 masks
   per point), kept where SAM's predicted IoU >= `min_quality` and the area is between
   `min_area` and `max_area` of the image; near-duplicates (IoU > 0.9 on a 64 x 64 grid) are
   dropped, the better-rated kept;
2. ranking: each proposal's crop (its box padded by 10 % to a square; pixels outside the mask
   filled with grey, so the background does not vote) is embedded by open_clip and scored
   by cosine similarity with "a photo of a {phrase}.";
3. the best proposal wins if its score reaches `threshold`; otherwise the object is not
   found (`Detections.found` False), which the rewards score as a failure, never an error.

The winner's mask gives the box, centre and area; its heading comes from an
`OrientationEstimator` (the mask-geometry default, or the user's own by `class_path`).

`objects()` (the `SceneSegmenter` call region rewards use) marks every object of a photo:
SAM's proposals under stricter quality rules, the backdrop and the duplicates and parts
dropped (`lit_grpo.perception.scene`).

Weights are local files only: SAM's checkpoint is read with `torch.load(weights_only=True)`
into a model built without one (segment_anything's own loader unpickles anything), open_clip's
through `create_model_and_transforms(name, pretrained=<file>)`. `SamClipSegmenter.from_models`
takes built models (tests use tiny random ones). The models stay outside the LightningModule's
state (no 2 GB of judges in every checkpoint) and move to the images' device when called.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_grpo.checks import ConfigError
from lit_grpo.perception.detections import Detections
from lit_grpo.perception.orientation import MaskAxisOrientation, OrientationEstimator
from lit_grpo.perception.scene import distinct_objects, stability_score

CropScorer = Callable[
    [Tensor, Tensor, str], Tensor
]  # (image [3,H,W], masks [M,H,W], phrase) -> [M]
_DEDUP_GRID = 64  # masks are compared for duplicates at this resolution
_DEDUP_IOU = 0.9
_CONTAIN = 0.9  # a scene mask this much inside larger ones is a duplicate or a part (ours)
_STABILITY_OFFSET = 1.0  # SAM's automatic mask generator's stability_score_offset
_ARTICLES = ("the ", "a ", "an ")


class ClipCropScorer:
    """Cosine similarity [M] between open_clip embeddings of an image's masked crops and a
    phrase. `size`, `mean`, `std`: the model's input size and normalisation."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        prompt: str = "a photo of a {}.",
        pad: float = 0.1,
        fill: float = 0.5,
        chunk: int = 16,
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.size, self.prompt = tokenizer, tuple(size), prompt
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.pad, self.fill, self.chunk = pad, fill, chunk

    def text(self, phrase: str) -> str:
        phrase = phrase.strip()
        for article in _ARTICLES:  # "the red mug" -> "a photo of a red mug."
            if phrase.lower().startswith(article):
                phrase = phrase[len(article) :]
        return self.prompt.format(phrase)

    def crops(self, image: Tensor, masks: Tensor) -> Tensor:
        """[M, 3, h, w] in [0, 1]: each mask's square crop, grey outside the mask."""
        from torchvision.ops import roi_align

        boxes = _square_boxes(masks, self.pad).to(image)  # [M, 4] x0, y0, x1, y1 px
        out = []
        for i in range(0, masks.shape[0], self.chunk):
            m = masks[i : i + self.chunk].to(image.device)[:, None].float()  # [m, 1, H, W]
            shown = (image[None] - self.fill) * m  # 0 = grey, also outside the image
            idx = torch.arange(m.shape[0], device=image.device, dtype=image.dtype)[:, None]
            rois = torch.cat([idx, boxes[i : i + self.chunk]], 1)
            out.append(roi_align(shown, rois, self.size, 1.0, sampling_ratio=2, aligned=True))
        return (torch.cat(out) + self.fill).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, image: Tensor, masks: Tensor, phrase: str) -> Tensor:
        if masks.shape[0] == 0:
            return torch.zeros(0, device=image.device)
        model = self.model.to(image.device)
        crops = (self.crops(image.float(), masks) - self.mean.to(image.device)) / self.std.to(
            image.device
        )
        img = F.normalize(model.encode_image(crops).float(), dim=-1)  # [M, D]
        tokens = self.tokenizer([self.text(phrase)]).to(image.device)
        txt = F.normalize(model.encode_text(tokens).float(), dim=-1)  # [1, D]
        return (img @ txt.T)[:, 0]


def _square_boxes(masks: Tensor, pad: float) -> Tensor:
    """Square boxes [M, 4] around each mask's box, padded by `pad` of its longer side."""
    rows, cols = masks.any(2), masks.any(1)  # [M, H], [M, W]
    h, w = masks.shape[-2:]
    ar_h, ar_w = torch.arange(h, device=masks.device), torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).min(1).values.float()
    y1 = torch.where(rows, ar_h, -1).max(1).values.float() + 1
    x0 = torch.where(cols, ar_w, w).min(1).values.float()
    x1 = torch.where(cols, ar_w, -1).max(1).values.float() + 1
    half = torch.maximum(x1 - x0, y1 - y0) * (0.5 + pad)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], 1)


def load_sam(checkpoint: str | os.PathLike, model: str = "vit_b") -> torch.nn.Module:
    """A segment_anything SAM of architecture `model` (vit_b, vit_l, vit_h) with the weights of
    a local checkpoint, read with `weights_only=True`."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM weights not found: {path.resolve()}. `sam_checkpoint` must be a local SAM "
            f"{model} checkpoint (e.g. sam_vit_b_01ec64.pth from segment-anything's model "
            "page); lit_grpo never downloads weights"
        )
    from segment_anything import sam_model_registry

    if model not in sam_model_registry:
        raise ConfigError(
            f"unknown SAM architecture {model!r}: one of {sorted(sam_model_registry)}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"SAM weights {path} are not a readable checkpoint ({type(err).__name__}); pass the "
            ".pth file of a SAM model"
        ) from None
    sam = sam_model_registry[model](checkpoint=None)
    try:
        sam.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise ConfigError(
            f"SAM weights {path} do not fit SAM {model!r} ({first}); set sam_model to the "
            "file's architecture (vit_b, vit_l or vit_h)"
        ) from None
    return sam.eval().requires_grad_(False)


def load_clip_scorer(
    model: str, pretrained: str | os.PathLike, prompt: str = "a photo of a {}."
) -> ClipCropScorer:
    """A `ClipCropScorer` over open_clip `model` (an architecture name, or the path of a model
    config .json) with the weights of a local file (loaded by `perception.clip`)."""
    from lit_grpo.perception.clip import load_open_clip

    try:
        clip = load_open_clip(model, pretrained)
    except ValueError as err:  # an unknown architecture: the user's config
        raise ConfigError(str(err)) from None
    return ClipCropScorer(
        clip.net,
        clip.tokenize,
        clip.size,
        clip.mean.flatten().tolist(),
        clip.std.flatten().tolist(),
        prompt,
    )


class SamClipSegmenter:
    """The `Segmenter` for real images: SAM mask proposals ranked by open_clip (module docstring).

    Args:
        sam_checkpoint: local SAM weights (.pth).
        clip_checkpoint: local open_clip weights for `clip_model`.
        sam_model: SAM architecture of the checkpoint: vit_b, vit_l or vit_h.
        clip_model: open_clip architecture name, or a model-config .json.
        threshold: the lowest CLIP cosine similarity that counts as found (ours: 0.2; matching
            crops of ViT-B-32 typically score 0.25-0.35, unrelated ones below 0.2).
        points_per_side: the prompt grid is points_per_side^2 points.
        min_quality: SAM's predicted IoU a proposal needs (ours: 0.7).
        min_area, max_area: a proposal's share of the image (drops specks and the backdrop).
        orientation: heading of the found mask (`MaskAxisOrientation()` by default).
        prompt: CLIP text template, "{}" replaced by the phrase.
        scene_quality, scene_stability: SAM's predicted IoU and stability score a proposal
            needs to count as an object in `objects()` (0.88 and 0.95: SAM's automatic mask
            generator's defaults; `lit_grpo.perception.scene`).
        scene_max_area, scene_max_sides: larger masks, or masks touching more of the image's
            four sides, are the backdrop, not objects (ours: 0.5 and 2).
    """

    def __init__(
        self,
        sam_checkpoint: str,
        clip_checkpoint: str,
        sam_model: str = "vit_b",
        clip_model: str = "ViT-B-32",
        threshold: float = 0.2,
        points_per_side: int = 16,
        min_quality: float = 0.7,
        min_area: float = 0.001,
        max_area: float = 0.9,
        orientation: OrientationEstimator | None = None,
        prompt: str = "a photo of a {}.",
        scene_quality: float = 0.88,
        scene_stability: float = 0.95,
        scene_max_area: float = 0.5,
        scene_max_sides: int = 2,
    ):
        files = {"sam_checkpoint": sam_checkpoint, "clip_checkpoint": clip_checkpoint}
        missing = [
            f"{k}: {Path(v).expanduser().resolve()}"
            for k, v in files.items()
            if not Path(v).expanduser().is_file()
        ]
        if missing:  # both named at once, before minutes of loading the other
            raise FileNotFoundError(
                f"weights not found ({'; '.join(missing)}). SamClipSegmenter needs a local "
                f"SAM {sam_model} checkpoint (e.g. sam_vit_b_01ec64.pth) and local open_clip "
                f"weights for {clip_model!r}; lit_grpo never downloads weights"
            )
        sam = load_sam(sam_checkpoint, sam_model)
        self._init(
            sam,
            load_clip_scorer(clip_model, clip_checkpoint, prompt),
            threshold=threshold,
            points_per_side=points_per_side,
            min_quality=min_quality,
            min_area=min_area,
            max_area=max_area,
            orientation=orientation,
            scene_quality=scene_quality,
            scene_stability=scene_stability,
            scene_max_area=scene_max_area,
            scene_max_sides=scene_max_sides,
        )

    @classmethod
    def from_models(
        cls,
        sam: torch.nn.Module,
        scorer: CropScorer,
        threshold: float = 0.2,
        points_per_side: int = 16,
        min_quality: float = 0.7,
        min_area: float = 0.001,
        max_area: float = 0.9,
        orientation: OrientationEstimator | None = None,
        scene_quality: float = 0.88,
        scene_stability: float = 0.95,
        scene_max_area: float = 0.5,
        scene_max_sides: int = 2,
    ) -> SamClipSegmenter:
        """From a built SAM and a crop scorer (a `ClipCropScorer`, or any callable
        `(image [3, H, W], masks [M, H, W], phrase) -> [M]`)."""
        segmenter = cls.__new__(cls)
        segmenter._init(
            sam,
            scorer,
            threshold=threshold,
            points_per_side=points_per_side,
            min_quality=min_quality,
            min_area=min_area,
            max_area=max_area,
            orientation=orientation,
            scene_quality=scene_quality,
            scene_stability=scene_stability,
            scene_max_area=scene_max_area,
            scene_max_sides=scene_max_sides,
        )
        return segmenter

    def _init(self, sam, scorer, **kw) -> None:
        if kw["points_per_side"] < 1:
            raise ValueError(f"points_per_side must be >= 1, got {kw['points_per_side']}")
        for low, high in (("min_area", "max_area"), ("min_area", "scene_max_area")):
            if not 0 <= kw[low] < kw[high] <= 1:
                raise ValueError(f"need 0 <= {low} < {high} <= 1, got {kw[low]}, {kw[high]}")
        if not 0 <= kw["scene_max_sides"] <= 4:
            raise ValueError(f"scene_max_sides must be 0 to 4, got {kw['scene_max_sides']}")
        self.sam = sam.eval().requires_grad_(False)
        self.scorer = scorer
        self.threshold, self.points_per_side = float(kw["threshold"]), int(kw["points_per_side"])
        self.min_quality, self.min_area = kw["min_quality"], kw["min_area"]
        self.max_area = kw["max_area"]
        self.scene_quality, self.scene_stability = kw["scene_quality"], kw["scene_stability"]
        self.scene_max_area, self.scene_max_sides = kw["scene_max_area"], kw["scene_max_sides"]
        orientation = kw["orientation"]
        self.orientation = orientation if orientation is not None else MaskAxisOrientation()

    def __deepcopy__(self, memo: dict) -> SamClipSegmenter:
        # a judge, not a trained part: copies of the module (EMA weights) share it
        return self

    @torch.no_grad()
    def propose(
        self,
        image: Tensor,
        min_quality: float | None = None,
        min_stability: float = 0.0,
        max_area: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """SAM's kept proposals for one image [3, H, W] in [0, 1]: masks [M, H, W] bool and
        their predicted IoU [M], best first. `min_quality` and `max_area` default to the
        segmenter's; `min_stability` is SAM's stability score (offset 1.0) a mask needs."""
        from segment_anything import SamPredictor

        min_quality = self.min_quality if min_quality is None else min_quality
        max_area = self.max_area if max_area is None else max_area

        device = image.device
        predictor = SamPredictor(self.sam.to(device))
        pixels = (image.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        predictor.set_image(pixels)
        h, w = pixels.shape[:2]
        k = self.points_per_side
        grid = (torch.arange(k, dtype=torch.float32) + 0.5) / k
        points = torch.stack(torch.meshgrid(grid * w, grid * h, indexing="xy"), -1).view(-1, 1, 2)
        masks, quality = [], []
        for chunk in points.split(64):
            coords = predictor.transform.apply_coords_torch(chunk.to(device), (h, w))
            labels = torch.ones(coords.shape[:2], device=device)
            logits, q, _ = predictor.predict_torch(
                coords, labels, multimask_output=True, return_logits=True
            )
            logits, q = logits.flatten(0, 1), q.flatten()  # [P * 3, H, W], [P * 3]
            m = logits > self.sam.mask_threshold
            area = m.flatten(1).float().mean(1)
            keep = (q >= min_quality) & (area >= self.min_area) & (area <= max_area)
            if min_stability > 0:
                stable = stability_score(logits, self.sam.mask_threshold, _STABILITY_OFFSET)
                keep &= stable >= min_stability
            masks.append(m[keep])
            quality.append(q[keep])
        masks, quality = torch.cat(masks), torch.cat(quality)
        order = quality.argsort(descending=True)
        masks, quality = masks[order], quality[order]
        keep = _distinct(masks)
        return masks[keep], quality[keep]

    def __call__(self, images: Tensor, phrases: Sequence[str]) -> Detections:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        if len(phrases) != images.shape[0]:
            raise ValueError(f"{len(phrases)} phrases for {images.shape[0]} images")
        n, _, h, w = images.shape
        found = torch.zeros(n, dtype=torch.bool)
        mask = torch.zeros(n, h, w, dtype=torch.bool)
        for i, phrase in enumerate(phrases):
            proposals, _ = self.propose(images[i])
            found[i], mask[i], _ = self._pick(images[i], proposals, phrase)
        return self._detections(images, found, mask)

    def locate(self, image: Tensor, phrases: Sequence[str]) -> tuple[Detections, Tensor]:
        """Each phrase's object in one image [3, H, W], SAM run once: `Detections` [P] and
        each phrase's best CLIP score [P] (NaN where SAM proposed nothing)."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
        p, (_, h, w) = len(phrases), image.shape
        found, mask = torch.zeros(p, dtype=torch.bool), torch.zeros(p, h, w, dtype=torch.bool)
        best = torch.full((p,), float("nan"))
        proposals, _ = self.propose(image)
        for i, phrase in enumerate(phrases):
            found[i], mask[i], best[i] = self._pick(image, proposals, phrase)
        return self._detections(image.expand(p, -1, -1, -1), found, mask), best

    def _pick(self, image: Tensor, proposals: Tensor, phrase: str) -> tuple[bool, Tensor, float]:
        """(found, the winning mask [H, W] on the CPU, its score) among the proposals."""
        if proposals.shape[0] == 0:
            return False, torch.zeros(image.shape[1:], dtype=torch.bool), float("nan")
        scores = self.scorer(image, proposals, phrase).float().cpu()
        best = int(scores.argmax())
        if scores[best] < self.threshold:
            return False, torch.zeros(image.shape[1:], dtype=torch.bool), float(scores[best])
        return True, proposals[best].cpu(), float(scores[best])

    def scene(self, image: Tensor) -> Tensor:
        """The objects of one image [3, H, W] in [0, 1]: masks [K, H, W] bool, one per object,
        largest first (`lit_grpo.perception.scene`)."""
        masks, _ = self.propose(
            image, self.scene_quality, self.scene_stability, self.scene_max_area
        )
        keep = distinct_objects(masks, self.scene_max_area, self.scene_max_sides, _CONTAIN)
        return masks[keep.to(masks.device)]

    def objects(self, images: Tensor) -> Tensor:
        """Every object's pixels [N, H, W] bool, the target's included (the `SceneSegmenter`
        call: what region rewards call "the other objects" once the edit region is out)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        out = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool)
        for i in range(images.shape[0]):
            out[i] = self.scene(images[i]).any(0).cpu()
        return out.to(images.device)

    def _detections(self, images: Tensor, found: Tensor, mask: Tensor) -> Detections:
        n, h, w = mask.shape
        ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5  # pixel centres
        xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
        area = mask.flatten(1).float().sum(1)
        weight = mask.float() / area.clamp_min(1)[:, None, None]
        centre = torch.stack([(weight * xs).sum((1, 2)), (weight * ys).sum((1, 2))], 1)
        rows, cols = mask.any(2), mask.any(1)
        box = torch.zeros(n, 4)
        for i in found.nonzero().flatten().tolist():
            r, c = rows[i].nonzero().flatten(), cols[i].nonzero().flatten()
            box[i] = torch.tensor([c[0], r[0], c[-1] + 1, r[-1] + 1], dtype=torch.float32)
        angle = torch.full((n,), float("nan"))
        if found.any():
            on = found.to(images.device)
            angle[found] = (
                self.orientation.headings(images[on], mask[found].to(images.device)).float().cpu()
            )
        det = Detections(found, mask, box, centre, angle, area)
        return det.to(images.device)


def _distinct(masks: Tensor) -> Tensor:
    """Indices of the masks (best first) with IoU <= 0.9 to every better one, on a coarse grid."""
    if masks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    small = F.adaptive_avg_pool2d(masks[:, None].float(), _DEDUP_GRID).flatten(1) > 0.5
    small = small.float()
    inter = small @ small.T
    sizes = small.sum(1)
    iou = inter / (sizes[:, None] + sizes[None, :] - inter).clamp_min(1)
    kept = torch.zeros(masks.shape[0], dtype=torch.bool)
    for i in range(masks.shape[0]):
        kept[i] = not bool((iou[i, :i][kept[:i]] > _DEDUP_IOU).any())
    return kept.nonzero().flatten()
