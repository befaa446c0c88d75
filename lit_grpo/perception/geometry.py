"""Object-level measurements of an edit, shared by the spatial rewards and the metrics.

Inputs are segmenter `Detections` of the named object in the source and in the edited image.
Everything returns per-sample tensors [N] with NaN where the object was not found in either
image, so callers decide what a miss is worth (the lowest reward; a failed metric).

Our definitions, on our conventions (pixels, y down, angles ccw as seen). Talk2Move names
its metrics (Trans. Dist., Acc., Rot. Err., L1) but does not give these thresholds; they and
the units are our choices:
- translation distance: centre displacement along the instructed direction, as a fraction
  of the image side;
- translation success: moved the instructed way by more than `min_move` (5 %) of the side,
  and more along the instructed direction than across it (within 45 deg of it);
- rotation error: |wrapped(angle_after - angle_before - instructed)| in degrees;
- scale ratio: sqrt(area_after / area_before), compared with the instructed factor.

Beside them, `geneval_relation` is GenEval's relative-position rule, as its code writes it,
`edit_region` is where an instructed edit may change the image (RC-GRPO's region), and
`target_region` where the object should be once edited (InstructRL4Pix's target region).
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lit_grpo.perception.detections import Detections


def _both(before: Detections, after: Detections) -> Tensor:
    return before.found & after.found


def displacement(before: Detections, after: Detections, image_size: tuple[int, int]) -> Tensor:
    """Centre displacement (dx, dy) as fractions of the image width and height [N, 2]."""
    h, w = image_size
    scale = torch.tensor([w, h], dtype=torch.float32, device=before.centre.device)
    d = (after.centre - before.centre).float() / scale
    return torch.where(_both(before, after)[:, None], d, torch.full_like(d, float("nan")))


def along_across(d: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
    """Components of displacements d [N, 2] along `direction` [N, 2] (signed) and across it
    (unsigned, the sideways drift), each [N], in d's units.

    The direction is normalised first, so any non-zero vector works; a zero direction (the
    rows of other tasks) gives 0 and 0. across = |d x u| = |d_x u_y - d_y u_x|, perpendicular
    for every direction (the swapped vector (u_y, u_x) is perpendicular only on the axes).
    """
    u = direction.float()
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    along = (d * u).sum(-1)
    across = (d[..., 0] * u[..., 1] - d[..., 1] * u[..., 0]).abs()
    return along, across


def translation_distance(
    before: Detections, after: Detections, direction: Tensor, image_size: tuple[int, int]
) -> Tensor:
    """Displacement along the instructed direction [N, 2], in image sides (signed) [N]."""
    return along_across(displacement(before, after, image_size), direction)[0]


def translation_success(
    before: Detections,
    after: Detections,
    direction: Tensor,
    image_size: tuple[int, int],
    min_move: float = 0.05,
) -> Tensor:
    """1.0 where the object moved more than `min_move` image sides along the instructed
    direction and more along it than across it (our rule), 0.0 else, NaN if missed."""
    along, across = along_across(displacement(before, after, image_size), direction)
    ok = ((along > min_move) & (along > across)).float()
    return torch.where(_both(before, after), ok, torch.full_like(ok, float("nan")))


GENEVAL_POSITION_THRESHOLD = 0.1  # GenEval's default `position_threshold` option


def geneval_relation(
    before: Detections,
    after: Detections,
    direction: Tensor,
    position_threshold: float = GENEVAL_POSITION_THRESHOLD,
) -> Tensor:
    """1.0 where the edited object's box stands in GenEval's relation to its source box in the
    instructed direction ("moved left": the after box is "left of" the before box), 0.0 else,
    NaN if missed. `direction` [N, 2] must be an axis: (-1, 0) left, (1, 0) right, (0, -1) up
    ("above"), (0, 1) down ("below").

    GenEval's rule (djghosh13/geneval, evaluation/evaluate_images.py, `relative_position(obj_a,
    obj_b)`, A = after, B = before): from the boxes' centres and sizes (w, h), the offset
    o = centre_a - centre_b shrinks per axis by `position_threshold` x (size_a + size_b),
    r = sign(o) max(|o| - t (size_a + size_b), 0) with t = 0.1; if every |r| < 1e-3 px there is no
    relation; else r / |o| (the norm of the unshrunk offset) has to exceed 0.5 along the axis
    (strictly). With no margin that is a cone of 60 deg either side of the axis; the margin
    narrows it, and for one object of size w moved straight along the axis by m it asks
    (m - 0.2 w) / m > 0.5, i.e. m > 0.4 w. Several relations can hold at once (a diagonal
    move can be both "left of" and "above").

    Where it differs from our `translation_success`: boxes rather than mask centroids; no
    minimum move in image sides but a margin in object sizes (a large object must move
    further, a small one may move less than 5 % of the side); a 60 deg cone rather than our
    45 deg (along > across); in pixels, so on a non-square image the cone is the pixels',
    not the image sides'. Only the four axis directions exist in GenEval.
    """
    u = direction.float()
    axis = ((u.abs() == 1).sum(-1) == 1) & ((u == 0).sum(-1) == 1)
    if not axis.all():
        i = int((~axis).nonzero()[0])
        raise ValueError(
            f"geneval_relation: GenEval's relations are left of / right of / above / below, so "
            f"a direction must be (+-1, 0) or (0, +-1); row {i} is ({u[i, 0]:g}, {u[i, 1]:g})"
        )
    a, b = after.box.float(), before.box.float()
    size = (a[:, 2:] - a[:, :2]).abs() + (b[:, 2:] - b[:, :2]).abs()  # [N, 2] (w_a + w_b, ...)
    offset = (a[:, :2] + a[:, 2:]) / 2 - (b[:, :2] + b[:, 2:]) / 2  # box centres [N, 2] px
    revised = (offset.abs() - position_threshold * size).clamp_min(0) * offset.sign()
    apart = (revised.abs() >= 1e-3).any(-1)
    unit = revised / offset.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # |o| >= 1e-3 if apart
    ok = (apart & ((unit * u).sum(-1) > 0.5)).float()
    return torch.where(_both(before, after), ok, torch.full_like(ok, float("nan")))


def wrap_degrees(angle: Tensor) -> Tensor:
    """Wrap to (-180, 180]."""
    return 180.0 - torch.remainder(180.0 - angle, 360.0)


def rotation_error(before: Detections, after: Detections, instructed: Tensor) -> Tensor:
    """|achieved - instructed| rotation in degrees, in [0, 180]; NaN if either angle is unreadable."""
    achieved = after.angle.float() - before.angle.float()
    err = wrap_degrees(achieved - instructed.float()).abs()
    return torch.where(_both(before, after), err, torch.full_like(err, float("nan")))


def achieved_rotation(before: Detections, after: Detections) -> Tensor:
    """The turn from the source's heading to the edit's, wrapped to (-180, 180] degrees
    (+ = ccw as seen) [N]; NaN if either heading is unreadable."""
    turn = wrap_degrees(after.angle.float() - before.angle.float())
    return torch.where(_both(before, after), turn, torch.full_like(turn, float("nan")))


def shape_iou(before: Detections, after: Detections, turn: Tensor) -> Tensor:
    """IoU of the edit's mask with the source mask turned by `turn` [N] degrees (+ = ccw as
    seen) about its centre and moved onto the edit's centre [N], in [0, 1]; NaN where either
    mask is missing or the turn is NaN.

    How much the edited object is still the source's shape whatever its heading and place
    (ours): a rigid copy, moved or turned, scores near 1 (rasterisation costs a little on
    shapes of a few pixels); a blur or a smear that only reads as some heading scores low.
    """
    n, h, w = before.mask.shape
    dev = before.mask.device
    a = torch.deg2rad(torch.nan_to_num(turn.float(), nan=0.0).to(dev))[:, None, None]
    ys = torch.arange(h, device=dev).float()[None, :, None] + 0.5  # pixel centres
    xs = torch.arange(w, device=dev).float()[None, None, :] + 0.5
    dx = xs - after.centre[:, 0, None, None].float()  # [N, 1, W]: offsets from the edit's centre
    dy = ys - after.centre[:, 1, None, None].float()  # [N, H, 1]
    # the inverse of a ccw turn as seen (y down) by a: the source pixel each one comes from
    sx = before.centre[:, 0, None, None].float() + dx * a.cos() - dy * a.sin()
    sy = before.centre[:, 1, None, None].float() + dx * a.sin() + dy * a.cos()
    col, row = torch.floor(sx).long(), torch.floor(sy).long()
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    flat = before.mask.bool().reshape(n, -1)
    index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).reshape(n, -1)
    moved = inside.reshape(n, -1) & flat.gather(1, index)  # [N, H*W]
    edit = after.mask.bool().reshape(n, -1)
    inter = (moved & edit).sum(1).float()
    union = (moved | edit).sum(1).float()
    iou = inter / union.clamp_min(1.0)
    ok = _both(before, after) & torch.isfinite(turn.to(dev)) & (union > 0)
    return torch.where(ok, iou, torch.full_like(iou, float("nan")))


def scale_ratio(before: Detections, after: Detections) -> Tensor:
    """Linear size ratio sqrt(area_after / area_before) [N]."""
    ratio = (after.area.float() / before.area.float().clamp_min(1e-6)).sqrt()
    return torch.where(_both(before, after), ratio, torch.full_like(ratio, float("nan")))


def scale_error(before: Detections, after: Detections, factor: Tensor) -> Tensor:
    """|log(achieved ratio / instructed factor)|: symmetric for growing and shrinking."""
    return (scale_ratio(before, after).log() - factor.float().log()).abs()


def outside_mask(masks: list[Tensor], dilate: int = 1) -> Tensor:
    """Pixels [N, H, W] outside every given object mask, each grown by `dilate` pixels."""
    union = torch.zeros_like(masks[0], dtype=torch.bool)
    for m in masks:
        union |= m.bool()
    if dilate > 0:
        k = 2 * dilate + 1
        union = torch.nn.functional.max_pool2d(union[:, None].float(), k, 1, dilate)[:, 0] > 0
    return ~union


def background_l1(source: Tensor, edited: Tensor, keep: Tensor) -> Tensor:
    """Mean |edited - source| over the `keep` pixels [N, H, W] (images in [0, 1]) [N]."""
    diff = (edited.float() - source.float()).abs().mean(1)  # [N, H, W]
    keep = keep.float()
    return (diff * keep).sum((1, 2)) / keep.sum((1, 2)).clamp_min(1.0)


def scene_shift(source: Tensor, edited: Tensor, keep: Tensor, direction: Tensor) -> Tensor:
    """How far the scene moved along `direction` [N, 2] between `source` and `edited`
    ([N, C, H, W]), read on the `keep` pixels [N, H, W]: signed pixels [N], NaN where the
    kept source has no texture along the direction to read a shift from.

    One Lucas-Kanade step along one axis (ours; a least-squares fit, not a paper's): with
    g = the source's central-difference gradient along the unit direction, a scene moved by
    s reads edited(x) = source(x - s u) ~ source(x) - s g(x), so
    s = -sum((edited - source) g) / sum(g^2) over the kept pixels and channels (the image's
    outer pixels, which have no central difference, left out). Exact for a linear ramp; a
    first-order reading otherwise, good for shifts small beside the texture's scale (the
    trained editors' scenes move by 0.1-0.3 px, docs/benchmarks.md). On a linear ramp a
    colour offset and a shift are the same change, and this reads both as a shift.
    """
    src, out = source.float(), edited.float()
    gx = torch.zeros_like(src)
    gy = torch.zeros_like(src)
    gx[..., :, 1:-1] = (src[..., :, 2:] - src[..., :, :-2]) / 2
    gy[..., 1:-1, :] = (src[..., 2:, :] - src[..., :-2, :]) / 2
    u = direction.float().to(src.device)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    g = gx * u[:, 0, None, None, None] + gy * u[:, 1, None, None, None]  # [N, C, H, W]
    inner = torch.zeros_like(keep, dtype=torch.bool)
    inner[:, 1:-1, 1:-1] = True
    w = (keep.bool() & inner).float()[:, None]  # [N, 1, H, W]
    num = ((out - src) * g * w).sum((1, 2, 3))
    den = (g * g * w).sum((1, 2, 3))
    textured = den > 1e-8
    return torch.where(textured, -num / den.clamp_min(1e-8), torch.full_like(num, float("nan")))


def edit_region(
    before: Detections,
    task: Sequence[str],
    direction: Tensor,
    factor: Tensor,
    image_size: tuple[int, int],
    move_fraction: float = 0.25,
    margin: int = 1,
) -> Tensor:
    """Where an edit may change the image [N, H, W] bool, from what a reward sees: the
    object's mask in the source and the instruction (no ground truth). RC-GRPO-Editing
    assumes an edit-region mask and does not say where it comes from; this is ours.

    - translate: the source mask and the mask shifted by the instructed displacement
      (`direction` [N, 2] x `move_fraction` of the image side; floor and ceil of a
      fractional shift both);
    - scale: the source mask and its box (padded by a pixel: the shape reaches past its
      half-covered pixels) grown about the mask's centre by `factor` [N] (shrinking keeps
      the box);
    - rotate: the disk about the mask's centre through its farthest pixel corner (any
      angle stays inside it);
    then grown by `margin` px (anti-aliased edges). Rows whose object was not found, or of
    another task, get the whole image: nothing says where the edit is.
    """
    h, w = image_size
    n = len(before)
    mask = before.mask.bool()
    region = torch.ones(n, h, w, dtype=torch.bool, device=mask.device)
    ys = torch.arange(h, device=mask.device).float()[:, None] + 0.5  # pixel centres
    xs = torch.arange(w, device=mask.device).float()[None, :] + 0.5
    for i in range(n):
        if not bool(before.found[i]) or not bool(mask[i].any()):
            continue
        m, (cx, cy) = mask[i], before.centre[i].float().tolist()
        if task[i] == "translate":
            dx, dy = (direction[i].float() * move_fraction * torch.tensor([w, h])).tolist()
            r = m.clone()
            for sx in {math.floor(dx), math.ceil(dx)}:
                for sy in {math.floor(dy), math.ceil(dy)}:
                    r |= _shifted(m, sx, sy)
        elif task[i] == "scale":
            # the shape reaches up to a pixel past its half-covered mask: pad, then grow
            x0, y0, x1, y1 = (before.box[i].float() + torch.tensor([-1, -1, 1, 1])).tolist()
            f = max(float(factor[i]), 1.0)
            box = (
                (xs >= cx + f * (x0 - cx))
                & (xs <= cx + f * (x1 - cx))
                & (ys >= cy + f * (y0 - cy))
                & (ys <= cy + f * (y1 - cy))
            )
            r = m | box
        elif task[i] == "rotate":
            dist = ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt()  # [H, W]
            radius = dist[m].max() + math.sqrt(0.5)  # the farthest pixel's far corner
            r = m | (dist <= radius)
        else:
            continue
        region[i] = r
    if margin > 0:
        k = 2 * margin + 1
        region = torch.nn.functional.max_pool2d(region[:, None].float(), k, 1, margin)[:, 0] > 0
    return region


def target_region(
    before: Detections,
    task: Sequence[str],
    direction: Tensor,
    angle: Tensor,
    factor: Tensor,
    image_size: tuple[int, int],
    move_fraction: float = 0.25,
) -> Tensor:
    """Where the object should be after the instructed edit [N, H, W] bool: its source mask
    moved by the instruction, from what a reward sees (no ground truth). Ours: InstructRL4Pix
    takes its target region as given.

    Each pixel centre p of the result takes the source mask at c + M^-1 (p - c - t), nearest
    pixel, with c the mask's centre and
    - translate: M = I, t = `direction` [N, 2] x `move_fraction` of the image side;
    - rotate: M the rotation by `angle` [N] degrees, + = counter-clockwise as seen (y down);
    - scale: M = `factor` [N] x I.
    Rows whose object was not found, or of another task, are empty: nothing says where the
    object should be.
    """
    h, w = image_size
    n = len(before)
    mask = before.mask.bool()
    region = torch.zeros(n, h, w, dtype=torch.bool, device=mask.device)
    ys = torch.arange(h, device=mask.device).float()[:, None] + 0.5  # pixel centres
    xs = torch.arange(w, device=mask.device).float()[None, :] + 0.5
    for i in range(n):
        if not bool(before.found[i]) or not bool(mask[i].any()):
            continue
        cx, cy = before.centre[i].float().tolist()
        dx, dy = xs - cx, ys - cy  # [1, W], [H, 1]: offsets from the centre
        if task[i] == "translate":
            tx, ty = (direction[i].float().cpu() * move_fraction * torch.tensor([w, h])).tolist()
            sx, sy = dx - tx, dy - ty
        elif task[i] == "rotate":
            # a ccw turn as seen (y down) takes (u, v) to (u cos a + v sin a, -u sin a + v cos a);
            # its inverse turns by -a
            a = math.radians(float(angle[i]))
            sx, sy = dx * math.cos(a) - dy * math.sin(a), dx * math.sin(a) + dy * math.cos(a)
        elif task[i] == "scale":
            f = float(factor[i])
            sx, sy = dx / f, dy / f
        else:
            continue
        col = torch.floor(cx + sx.expand(h, w)).long()  # the source pixel each one comes from
        row = torch.floor(cy + sy.expand(h, w)).long()
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        region[i] = inside & mask[i][row.clamp(0, h - 1), col.clamp(0, w - 1)]
    return region


def _shifted(mask: Tensor, dx: int, dy: int) -> Tensor:
    """mask [H, W] moved by (dx, dy) whole pixels, what leaves the frame dropped."""
    h, w = mask.shape
    out = torch.zeros_like(mask)
    ys, xs = slice(max(dy, 0), min(h + dy, h)), slice(max(dx, 0), min(w + dx, w))
    out[ys, xs] = mask[max(-dy, 0) : min(h - dy, h), max(-dx, 0) : min(w - dx, w)]
    return out
