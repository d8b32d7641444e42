"""Models and data from outside a run directory, for `flain defend --model`: a model factory
named `module:function`, state_dicts saved with `torch.save`, and image sets as `.npz` files
(`images`, `labels`) or torchvision-style folders (one sub-folder of images per class).
Everything read here is untrusted: a bad file gets one line naming it and what is wrong."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from server.results import RunFileError
from strategies.flain_defense import one_line

ImageSet = tuple[torch.Tensor, torch.Tensor]  # images N x C x H x W (uint8 or float in [0, 1]), labels N


def model_factory(ref: str) -> nn.Module:
    """The model `module:function` builds (the current directory is importable)."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise RunFileError(f"--model {ref!r}: expected MODULE:FUNCTION, e.g. mypackage.models:Net")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RunFileError(f"--model {ref!r}: {one_line(exc)}") from None
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001 - the user's code: report it in one line
        raise RunFileError(f"--model {ref!r}: calling it with no arguments raised {one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise RunFileError(f"--model {ref!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def state_dict(path: Path, model: nn.Module, what: str) -> dict[str, torch.Tensor]:
    """A state_dict for `model` from `path` (`torch.load(weights_only=True)`: no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunFileError(f"{what} {path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt or non-torch file
        raise RunFileError(f"{what} {path}: not a torch.save file of tensors ({one_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunFileError(f"{what} {path}: expected a state_dict (names -> tensors), got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise RunFileError(f"{what} {path} does not fit the model: {' '.join(line.strip() for line in first[:3])}") from None
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise RunFileError(f"{what} {path}: holds NaN or infinite values")
    return state


def image_set(path: Path, what: str) -> ImageSet:
    """(images, labels) from an `.npz` (arrays `images`, `labels`) or a class-folder tree."""
    if path.is_dir():
        images, labels = _folder(path, what)
    elif path.is_file():
        images, labels = _npz(path, what)
    else:
        raise RunFileError(f"{what} {path}: no such file or folder")
    if images.dim() == 3:  # N x H x W: one channel
        images = images.unsqueeze(1)
    if images.dim() != 4 or len(images) == 0 or labels.shape != (len(images),):
        raise RunFileError(f"{what} {path}: images {tuple(images.shape)} and labels {tuple(labels.shape)}: "
                           "need N x C x H x W (or N x H x W) images and N labels, N >= 1")
    if images.is_floating_point() and not (torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1):
        raise RunFileError(f"{what} {path}: float images must be finite and in [0, 1] (or give uint8)")
    if not images.is_floating_point() and images.dtype != torch.uint8:
        raise RunFileError(f"{what} {path}: images must be uint8 or float in [0, 1], got {images.dtype}")
    if labels.is_floating_point() or labels.is_complex() or (labels < 0).any():
        raise RunFileError(f"{what} {path}: labels must be non-negative integers")
    return images, labels.long()


def _npz(path: Path, what: str) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as data:
            if not {"images", "labels"} <= set(data.files):
                raise RunFileError(f"{what} {path}: an .npz needs arrays 'images' and 'labels', it has {data.files}")
            return torch.from_numpy(data["images"].copy()), torch.from_numpy(data["labels"].copy())
    except RunFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - not an npz, or object arrays
        raise RunFileError(f"{what} {path}: not a readable .npz ({one_line(exc)})") from None


def _image(path: str) -> torch.Tensor:
    """One image as C x H x W uint8: grayscale stays one channel, anything else becomes RGB."""
    from PIL import Image

    with Image.open(path) as img:
        img = img if img.mode in ("L", "RGB") else img.convert("RGB")
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).unsqueeze(0) if array.ndim == 2 else torch.from_numpy(array.copy()).permute(2, 0, 1)


def _folder(path: Path, what: str) -> ImageSet:
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(path), loader=_image)
        pairs = [folder[i] for i in range(len(folder))]
    except Exception as exc:  # noqa: BLE001 - no class folders, an unreadable image
        raise RunFileError(f"{what} {path}: not a folder of class folders of images ({one_line(exc)})") from None
    shapes = {tuple(img.shape) for img, _ in pairs}
    if len(shapes) != 1:
        raise RunFileError(f"{what} {path}: images of different shapes {sorted(shapes)[:3]}: resize them to one size")
    return torch.stack([img for img, _ in pairs]), torch.tensor([label for _, label in pairs])
