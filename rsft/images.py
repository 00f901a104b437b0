"""Sample grids as PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from rsft.runtime import atomic_path


def images_to_grid(images: np.ndarray, columns: int = 10, padding: int = 2) -> np.ndarray:
    """Tile uint8 images [n, h, w] into one uint8 image, row by row."""
    count, height, width = images.shape
    rows = max(1, math.ceil(count / columns))
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding), 255, np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        grid[top:top + height, left:left + width] = image
    return grid


def save_grid(images: np.ndarray, path: str | Path, columns: int = 10) -> None:
    """Write a PNG grid of uint8 images [n, h, w] atomically."""
    with atomic_path(path) as temporary:
        # PNG written by Pillow carries no timestamp, so equal images give equal files.
        Image.fromarray(images_to_grid(images, columns)).save(temporary, format="PNG")
