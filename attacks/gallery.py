"""A picture of what is injected: a clean image, every trigger, every DBA part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from attacks.triggers import PIXEL_COUNTS, TriggerScheme, cba, dba


def panels(image: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(title, stamped image) for the clean image and each pattern; image is C x H x W uint8."""
    height, width = image.shape[-2:]
    batch = image.unsqueeze(0)
    schemes: dict[str, TriggerScheme] = {"cba": cba(height, width), "dba (whole)": dba(height, width)}
    out = [("clean", image)]
    out += [(name, scheme.full.stamp(batch)[0]) for name, scheme in schemes.items()]
    out += [(f"dba part {k + 1}", part.stamp(batch)[0]) for k, part in enumerate(schemes["dba (whole)"].parts)]
    out += [(f"{n} pixels", cba(height, width, pixels=n).full.stamp(batch)[0]) for n in PIXEL_COUNTS]
    return out


def draw(image: torch.Tensor, title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = panels(image)
    fig, axes = plt.subplots(1, len(items), figsize=(1.6 * len(items), 2.0))
    for ax, (name, img) in zip(axes, items):
        pixels = img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy()
        ax.imshow(pixels.astype(np.uint8), cmap=None if img.shape[0] == 3 else "gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out
