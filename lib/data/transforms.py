"""Train and eval image transforms (torchvision v2, or albumentations for the train presets' augmentations) by preset
name, and batch mixing (mixup / cutmix). Never a vertical flip: photos have an up."""

import math

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST}


# How a photo becomes img_size x img_size. crop: shorter side to img_size, centre crop (cuts the long side's edges);
# squash: the whole photo to img_size x img_size, aspect ratio ignored; pad: longer side to img_size, then padded to a
# square with the mean colour (normalizes to 0, so the bars carry no signal). Measured: bench/bench_resize_modes.py.
RESIZES = ("crop", "squash", "pad")


class ResizePad:
    """Longer side to `size`, then centred on a `size` x `size` square of colour `fill` (PIL image or tensor)."""

    def __init__(self, size: int, interpolation: InterpolationMode, fill: list[int]):
        self.size, self.interpolation, self.fill = size, interpolation, fill

    def __call__(self, img):
        h, w = F.get_size(img)
        nh, nw = (max(1, round(side * self.size / max(h, w))) for side in (h, w))
        img = F.resize(img, [nh, nw], interpolation=self.interpolation, antialias=True)
        left, top = (self.size - nw) // 2, (self.size - nh) // 2
        return F.pad(img, [left, top, self.size - nw - left, self.size - nh - top], fill=self.fill)

    def __repr__(self) -> str:  # deterministic: the embedding cache keys on the transform's repr
        return f"ResizePad(size={self.size}, interpolation={self.interpolation}, fill={self.fill})"


class RandomPhotoCrop:
    """A random crop of `scale` of the photo's area whose aspect ratio is the photo's own times `ratio` (PIL image or
    tensor), not resized: RandomResizedCrop without the resize, its ratio relative to the photo. The squash and pad
    modes train on this followed by their eval resize. Why not RandomResizedCrop: its ratio range is absolute
    (3/4..4/3), so its crops of a 2:1 photo are at most 4:3 and cut off a third of the width, the edges those modes
    exist to keep. Relative to the photo's shape, a crop keeps about scale[0] of the photo or more (one clipped at the
    photo's edge a little less), at full resolution (cropping after the squash would upsample the crop), with the
    same mild shape jitter; the eval transform is its scale = ratio = 1 case."""

    def __init__(self, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)):
        self.scale, self.log_ratio = scale, (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, img):
        h, w = F.get_size(img)
        area = torch.empty(1).uniform_(*self.scale).item()
        ratio = math.exp(torch.empty(1).uniform_(*self.log_ratio).item())
        cw = min(w, max(1, round(w * math.sqrt(area * ratio))))
        ch = min(h, max(1, round(h * math.sqrt(area / ratio))))
        top = int(torch.randint(0, h - ch + 1, (1,)))
        left = int(torch.randint(0, w - cw + 1, (1,)))
        return F.crop(img, top, left, ch, cw)

    def __repr__(self) -> str:
        ratio = tuple(round(math.exp(r), 4) for r in self.log_ratio)
        return f"RandomPhotoCrop(scale={tuple(self.scale)}, ratio={ratio})"


def _resize(resize: str, img_size: int, interp: InterpolationMode, mean_fill: list[int]) -> list:
    """The eval transform's geometric steps of a resize mode."""
    if resize == "crop":
        return [v2.Resize(img_size, interpolation=interp, antialias=True), v2.CenterCrop(img_size)]
    if resize == "squash":
        return [v2.Resize((img_size, img_size), interpolation=interp, antialias=True)]
    return [ResizePad(img_size, interp, mean_fill)]


def _train_crop(resize: str, img_size: int, interp: InterpolationMode, mean_fill: list[int], scale) -> list:
    if resize == "crop":
        return [v2.RandomResizedCrop(img_size, scale=scale, interpolation=interp, antialias=True)]
    return [RandomPhotoCrop(scale), *_resize(resize, img_size, interp, mean_fill)]


# Which library draws a preset's augmentations. The crop that defines the resize mode is torchvision's in both, so the
# two backends frame a photo alike and differ only in the augmentations (the marmoset pipeline's --aug_backend).
BACKENDS = ("torchvision", "albumentations")


class Albumentations:
    """An albumentations pipeline as a step of a torchvision Compose: PIL image or HWC uint8 array in, HWC uint8 array
    out (v2.ToImage takes it). Its random draws are seeded from torch's RNG on every call, so a seeded view
    (lib.train.feature_cache.SeededView) and a resumed run draw the same augmentations as with torchvision."""

    def __init__(self, steps: list):
        import albumentations as A  # imports cv2 and pydantic: loaded only when this backend is asked for

        self.pipeline = A.Compose(steps)

    def __call__(self, img):
        self.pipeline.set_random_seed(int(torch.randint(2**31 - 1, ()).item()))
        return self.pipeline(image=np.asarray(img))["image"]

    def __repr__(self) -> str:  # deterministic: the embedding cache keys on the transform's repr
        return f"Albumentations({self.pipeline!r})"


def _light(img_size: int, interp: InterpolationMode, hflip: bool, mean_fill: list[int], resize: str = "crop",
           scale=(0.8, 1.0), backend: str = "torchvision") -> tuple[list, list]:
    crop = _train_crop(resize, img_size, interp, mean_fill, scale)
    if backend == "albumentations":
        import albumentations as A
        import cv2

        return [*crop, Albumentations([
            *([A.HorizontalFlip(p=0.5)] if hflip else []),
            A.Affine(rotate=(-15, 15), interpolation=cv2.INTER_LINEAR, fill=tuple(mean_fill), p=1.0),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.05, p=1.0),
        ])], []
    return [
        *crop,
        *([v2.RandomHorizontalFlip(p=0.5)] if hflip else []),
        # Bilinear: the tensor kernel has no bicubic, and at <= 15 degrees the difference is invisible. Corners
        # are filled with the mean colour, which normalizes to zero, so they do not teach the model a black frame.
        v2.RandomRotation(15, interpolation=InterpolationMode.BILINEAR, fill=mean_fill),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.05),
    ], []


def _strong(img_size: int, interp: InterpolationMode, hflip: bool, mean_fill: list[int],
            resize: str = "crop", backend: str = "torchvision") -> tuple[list, list]:
    light, _ = _light(img_size, interp, hflip, mean_fill, resize, scale=(0.6, 1.0), backend=backend)
    kernel = 2 * (img_size // 40) + 1
    if backend == "albumentations":
        import albumentations as A

        # erased before normalization, so filled with the mean colour, which normalizes to 0 as torchvision's does
        return [*light, Albumentations([A.GaussianBlur(blur_limit=(kernel, kernel), sigma_limit=(0.1, 2.0), p=0.2),
                                        A.Erasing(fill=tuple(mean_fill), p=0.25)])], []
    blur = v2.GaussianBlur(kernel_size=kernel, sigma=(0.1, 2.0))
    # Erasing acts on the normalized tensor, so its zero fill is the mean colour.
    return [*light, v2.RandomApply([blur], p=0.2)], [v2.RandomErasing(p=0.25, value=0)]


# Each preset gives (augmentations on the uint8/PIL image, augmentations after normalization); the ends are shared.
PRESETS = {"none": None, "light": _light, "strong": _strong}


def build_transforms(img_size: int, mean, std, preset: str = "light", hflip: bool = True,
                     interpolation: str = "bicubic", resize: str = "crop",
                     backend: str = "torchvision") -> tuple[v2.Compose, v2.Compose]:
    """(train_tf, eval_tf): RGB PIL image or uint8 (3, H, W) tensor -> normalized float (3, img_size, img_size).

    Eval by `resize` (RESIZES): 'crop' shorter side to img_size, centre crop; 'squash' the whole photo to img_size x
    img_size; 'pad' longer side to img_size, padded to a square with the mean colour. Train: 'crop' a
    RandomResizedCrop; 'squash'/'pad' a random crop of most of the photo (RandomPhotoCrop), then the eval resize.
    'none' trains on the eval transform; 'strong' adds a wider crop scale, blur and random erasing to 'light'.
    `backend` (BACKENDS) draws the train augmentations; the eval transform is the same for both.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; valid: {sorted(PRESETS)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: {sorted(INTERPOLATIONS)}")
    if resize not in RESIZES:
        raise ValueError(f"unknown resize mode {resize!r}; valid: {list(RESIZES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown augmentation backend {backend!r}; valid: {list(BACKENDS)}")
    interp = INTERPOLATIONS[interpolation]
    mean_fill = [round(255 * m) for m in mean]
    # ToImage comes after the geometric and colour steps: on a PIL image they run PIL's C kernels, far faster than
    # the same steps on a tensor (docs/benchmarks.md, "Figures behind lib's defaults").
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    eval_tf = v2.Compose([*_resize(resize, img_size, interp, mean_fill), *to_float])
    if PRESETS[preset] is None:
        return eval_tf, eval_tf
    before, after = PRESETS[preset](img_size, interp, hflip, mean_fill, resize, backend=backend)
    return v2.Compose([*before, *to_float, *after]), eval_tf


class ShuffledMix:
    """A torchvision batch mix on the batch in random order. torchvision mixes each photo with the one before it, and
    a P x K batch holds each class's K photos side by side: unshuffled, (K - 1) / K of the pairs would be two photos of
    one class, which mixing leaves a photo of that class."""

    def __init__(self, mix):
        self.mix = mix

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.randperm(len(labels)).to(labels.device)
        return self.mix(images[order], labels[order])

    def __repr__(self) -> str:
        return f"ShuffledMix({self.mix!r})"


def batch_mix(mixup: float, cutmix: float, n_classes: int) -> ShuffledMix | None:
    """Mixup and/or cutmix (torchvision's, Beta(alpha, alpha) mixing weights; 0: off) as one callable (images,
    class indices) -> (mixed images, class weights (B, n_classes), each row summing to 1), the batch shuffled first;
    one of the two drawn per batch when both are on. None when both are off."""
    if mixup < 0 or cutmix < 0:
        raise ValueError(f"mixup and cutmix are Beta alphas >= 0 (0: off), got {mixup} and {cutmix}")
    mixes = ([v2.MixUp(alpha=mixup, num_classes=n_classes)] if mixup else []) + \
        ([v2.CutMix(alpha=cutmix, num_classes=n_classes)] if cutmix else [])
    if not mixes:
        return None
    return ShuffledMix(mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes))
