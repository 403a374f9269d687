"""Small JPEG folders for tests: one sub-folder per class."""
from pathlib import Path

from PIL import Image


def write_folder(root: Path, num_classes: int, per_class: int, image) -> Path:
    """``root/c{k}/{i}.jpg`` for every class k and index i, the pixels ``image(k, i)``: (H, W, 3) uint8."""
    for k in range(num_classes):
        for i in range(per_class):
            path = root / f"c{k}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image(k, i)).save(path, quality=90)
    return root
