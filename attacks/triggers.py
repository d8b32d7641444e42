"""Pixel-pattern triggers. A trigger has one job: stamp its pattern on images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PixelTrigger:
    """Sets a fixed set of pixel positions to the brightest value, in every channel.

    `mask` is a boolean H x W array. Images are (N, C, H, W) or (N, H, W); uint8
    images get 255, float images get 1.0. Nothing outside the mask changes.
    """

    mask: np.ndarray

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """A copy of `images` with the pattern stamped."""
        if tuple(images.shape[-2:]) != self.mask.shape:
            raise ValueError(
                f"trigger is {self.mask.shape[0]}x{self.mask.shape[1]}, "
                f"images are {tuple(images.shape[-2:])}"
            )
        out = images.clone()
        white = 255 if out.dtype == torch.uint8 else 1.0
        out[..., torch.from_numpy(self.mask)] = white
        return out

    @property
    def num_pixels(self) -> int:
        return int(self.mask.sum())


def square(size: int, height: int, width: int, margin: int = 0) -> PixelTrigger:
    """A size x size square in the bottom-right corner, `margin` pixels from the edges."""
    mask = np.zeros((height, width), dtype=bool)
    r1, c1 = height - margin, width - margin
    mask[r1 - size : r1, c1 - size : c1] = True
    return PixelTrigger(mask)


def cba(height: int, width: int) -> PixelTrigger:
    """Centralized backdoor (Bagdasaryan et al. 2020): every malicious client stamps
    the whole pattern; for 28x28 a 5x5 white square at rows/cols 23-27."""
    return square(5, height, width)
