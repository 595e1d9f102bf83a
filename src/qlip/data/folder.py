"""Image folders with one subfolder per class (the ImageNet layout), for evaluation and linear probes.

    root/
      goldfish/ img001.jpg ...
      tabby cat/ ...

Class names are the subfolder names sorted, labels their positions. A file that cannot be read is yielded as a
bad marker (see :mod:`qlip.data.sample`), never raised.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from ..transforms import Background, ImageLoadError
from .sample import Sample, bad_marker, read_image_checked

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive) and is not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class ImageFolderDataset(Dataset):
    """Labelled images from ``root/<class name>/<image>``.

    Attributes:
        root: the folder holding one subfolder per class.
        caption_template: if set (e.g. "a photo of a {}."), samples get this caption with the class name.
        min_size: images smaller than this on either side are bad ("too_small").
        max_pixels: images with more pixels are bad ("decompression_bomb"); None uses PIL's limit.
        background: the color transparent images are flattened onto (white, black or #rrggbb).
    """

    root: str | os.PathLike
    caption_template: str | None = None
    min_size: int = 1
    max_pixels: int | None = None
    background: Background = "white"

    def __post_init__(self) -> None:
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
        self.classnames: list[str] = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classnames:
            raise ValueError(f"image folder {root} has no class subfolders; expected root/<class>/<image> files")
        self.files: list[tuple[str, int]] = []
        skipped = 0
        for label, name in enumerate(self.classnames):
            for dirpath, dirnames, filenames in os.walk(root / name):
                dirnames.sort()
                for fname in sorted(filenames):
                    if is_image_name(fname):
                        self.files.append((os.path.join(dirpath, fname), label))
                    else:
                        skipped += 1
        if skipped:
            logger.warning("%s: ignored %d files without an image extension %s", root, skipped, IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"image folder {root} has class subfolders but no image files")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.files[index]
        key = os.path.relpath(path, self.root)
        try:
            image = read_image_checked(path, path, min_size=self.min_size, max_pixels=self.max_pixels,
                                       background=self.background)  # fmt: skip
        except ImageLoadError as err:
            return bad_marker(key, err.reason, str(err))
        caption = self.caption_template.format(self.classnames[label]) if self.caption_template else None
        return {"image": image, "caption": caption, "label": label, "key": key}
