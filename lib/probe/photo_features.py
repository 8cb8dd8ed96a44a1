"""Engineered features of one photo for the probe's hybrid scorer: what a CNN's pooled embedding may blur away.

- colour: joint HSV histogram of the foreground (8 hue x 4 saturation x 4 value bins), summing to 1;
- lbp: histogram of rotation-invariant uniform local binary patterns (8 neighbours, radius 1: 10 codes) of the
  foreground, fine texture such as fur, spots or bark, summing to 1;
- hog: histogram of oriented gradients of the photo squashed to 64 x 64 (9 orientations, 16 px cells, 2 x 2
  blocks): coarse shape and pose.
Photos are first scaled to at most MAX_SIDE px: global statistics need no more, and it keeps a photo at a few ms.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image
from skimage.feature import hog, local_binary_pattern

PHOTO_FEATURES = ("colour", "lbp", "hog")
MAX_SIDE = 128
HSV_BINS = (8, 4, 4)
LBP_POINTS, LBP_RADIUS = 8, 1
HOG_SIDE = 64
HOG = {"orientations": 9, "pixels_per_cell": (16, 16), "cells_per_block": (2, 2)}
# what the features depend on besides the photo: part of their cache key, so a change here computes them again
SETTINGS = {"max_side": MAX_SIDE, "hsv_bins": HSV_BINS, "lbp": (LBP_POINTS, LBP_RADIUS), "hog_side": HOG_SIDE, **HOG}


def photo_features(image: Image.Image, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{'colour', 'lbp', 'hog'} float32 vectors of one photo. mask: bool (H, W) at the image's size, True =
    foreground; the histograms count only its pixels (the whole photo where it holds none)."""
    rgb = image.convert("RGB")
    if mask is not None and mask.shape != (rgb.height, rgb.width):
        raise ValueError(f"mask shape {mask.shape} does not match image size (H, W) {(rgb.height, rgb.width)}")
    scale = min(1.0, MAX_SIDE / max(rgb.size))
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    pixels = np.asarray(rgb.resize(size, Image.BILINEAR))
    fg = np.ones(pixels.shape[:2], bool)
    if mask is not None:
        fg = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        if not fg.any():
            fg = np.ones_like(fg)
    gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)

    hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)  # OpenCV's 8-bit hue runs 0..179
    colour = cv2.calcHist([hsv], [0, 1, 2], fg.astype(np.uint8), list(HSV_BINS), [0, 180, 0, 256, 0, 256]).ravel()

    codes = local_binary_pattern(gray, LBP_POINTS, LBP_RADIUS, method="uniform")
    lbp = np.bincount(codes[fg].astype(int), minlength=LBP_POINTS + 2).astype(np.float64)

    # the background takes the foreground's mean grey, so it adds no gradients of its own beyond the outline
    filled = np.where(fg, gray, int(gray[fg].mean())).astype(np.uint8)
    square = cv2.resize(filled, (HOG_SIDE, HOG_SIDE), interpolation=cv2.INTER_AREA)
    shape = hog(square, **HOG, feature_vector=True)
    return {"colour": (colour / colour.sum()).astype(np.float32), "lbp": (lbp / lbp.sum()).astype(np.float32),
            "hog": shape.astype(np.float32)}
