"""Pixel-pattern triggers. A trigger has one job: stamp its pattern on images.

Geometry (H x W images, patterns placed in a corner, `margin` pixels from its edges):
  cba            a filled square: 5x5 on 28x28 (rows/cols 23-27), 4x4 on 32x32
  dba            a plus sign, arms of 2 pixels (9 pixels in a 5x5 box), split in parts:
                 28x28: 2 parts, the vertical bar (with the centre) and the horizontal arms;
                 32x32: 4 parts, up arm + centre, down arm, left arm, right arm
  trigger-pixels N in {3, 5, 7, 9}: N pixels of a 3x3 box, added in the order
                 centre, up, down (3: a vertical bar), left, right (5: a plus),
                 top-left, bottom-right (7), top-right, bottom-left (9: the full box)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")
PIXEL_COUNTS = (3, 5, 7, 9)
# (row, col) offsets inside the 3x3 box, in the order pixels are added
_BOX_ORDER = [(1, 1), (0, 1), (2, 1), (1, 0), (1, 2), (0, 0), (2, 2), (0, 2), (2, 0)]


@dataclass(frozen=True)
class PixelTrigger:
    """Sets the pixels of `mask` (H x W, bool) to `value` (a share of the brightest
    value: 255 for uint8 images, 1.0 for float ones) in every channel. Images are
    (N, C, H, W) or (N, H, W); nothing outside the mask changes."""

    mask: np.ndarray
    value: float = 1.0

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """A copy of `images` with the pattern stamped."""
        if tuple(images.shape[-2:]) != self.mask.shape:
            raise ValueError(
                f"trigger is {self.mask.shape[0]}x{self.mask.shape[1]}, "
                f"images are {tuple(images.shape[-2:])}"
            )
        out = images.clone()
        out[..., torch.from_numpy(self.mask).to(out.device)] = round(self.value * 255) if out.dtype == torch.uint8 else self.value
        return out

    @property
    def num_pixels(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class TriggerScheme:
    """An attack's pattern: the whole trigger (stamped at test time, for ASR) and the
    part each malicious client stamps (client of rank k among the malicious: part k mod n)."""

    full: PixelTrigger
    parts: tuple[PixelTrigger, ...]

    def for_client(self, rank: int) -> PixelTrigger:
        return self.parts[rank % len(self.parts)]


def _place(box: np.ndarray, height: int, width: int, corner: str, margin: int) -> np.ndarray:
    """Put a small boolean box in a corner of an H x W mask."""
    if corner not in CORNERS:
        raise ValueError(f"trigger-corner={corner!r}: choose one of {list(CORNERS)}")
    h, w = box.shape
    if h + margin > height or w + margin > width:
        raise ValueError(f"a {h}x{w} trigger with trigger-margin={margin} does not fit {height}x{width} images")
    top = margin if corner.startswith("top") else height - margin - h
    left = margin if corner.endswith("left") else width - margin - w
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + h, left : left + w] = box
    return mask


def square_box(size: int) -> np.ndarray:
    return np.ones((size, size), dtype=bool)


def pixel_box(count: int) -> np.ndarray:
    if count not in PIXEL_COUNTS:
        raise ValueError(f"trigger-pixels={count}: choose one of {list(PIXEL_COUNTS)}")
    box = np.zeros((3, 3), dtype=bool)
    for r, c in _BOX_ORDER[:count]:
        box[r, c] = True
    return box


def plus_parts(arm: int, parts: int) -> list[np.ndarray]:
    """A plus sign in a (2*arm+1) box, split into 2 (vertical / horizontal) or 4 (arms) disjoint parts."""
    n = 2 * arm + 1
    up, down, left, right, centre = (np.zeros((n, n), dtype=bool) for _ in range(5))
    up[:arm, arm] = down[arm + 1 :, arm] = left[arm, :arm] = right[arm, arm + 1 :] = centre[arm, arm] = True
    if parts == 2:
        return [up | centre | down, left | right]
    if parts == 4:
        return [up | centre, down, left, right]
    raise ValueError(f"a plus sign splits into 2 or 4 parts, not {parts}")


def cba(height: int, width: int, pixels: int = 0, value: float = 1.0,
        corner: str = "bottom-right", margin: int = 0) -> TriggerScheme:
    """Centralized backdoor (Bagdasaryan et al. 2020): every malicious client stamps the
    whole pattern (a square, or an N-pixel pattern with `pixels`)."""
    box = pixel_box(pixels) if pixels else square_box(5 if height <= 28 else 4)
    full = PixelTrigger(_place(box, height, width, corner, margin), value)
    return TriggerScheme(full, (full,))


def dba(height: int, width: int, pixels: int = 0, value: float = 1.0,
        corner: str = "bottom-right", margin: int = 0) -> TriggerScheme:
    """Distributed backdoor (Xie et al., ICLR 2020): the plus sign split in parts; each
    malicious client stamps one part, ASR is measured with the whole plus."""
    if pixels:
        raise ValueError("trigger-pixels applies to trigger=cba only (dba uses its plus-sign parts)")
    boxes = plus_parts(arm=2, parts=2 if height <= 28 else 4)
    parts = tuple(PixelTrigger(_place(b, height, width, corner, margin), value) for b in boxes)
    full = PixelTrigger(np.logical_or.reduce([p.mask for p in parts]), value)
    return TriggerScheme(full, parts)
