"""TFDS builders that prepare offline, without TensorFlow, in array_record format.

* ``SasaDigits``: scikit-learn's handwritten digits (shipped inside scikit-learn), upsampled
  from 8x8 to 32x32 RGB; a fixed split: every fifth image (index % 5 == 0) is test
  (1,437 train, 360 test).
* ``SasaDigitsClutter``: the harder cluttered digits of ``digits_clutter`` (48x48 RGB, 5,748
  train, 1,440 test), from the same train/test digit split.
* ``SasaImageFolder``: your own images, ``DIR/<class>/*`` or
  ``DIR/{train,test|validation}/<class>/*``. Classes are the sorted folder names. Without split
  folders, a file goes to test when the MD5 of its relative path falls in the lowest
  ``test_percent`` (default 10%) -- deterministic and stable when files are added. PNG and JPEG
  (and anything else Pillow reads) are stored as PNG. Unreadable or corrupt files are skipped
  and listed in ``unreadable``; ``sources.load_dataset`` then discards the build and raises
  one ValueError that names them all (fix or remove them, then run again).

Both are built on first use into the TFDS data dir (``TFDS_DATA_DIR`` or ``~/tensorflow_datasets``
unless a data_dir is given).
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from sasa_jax.data import digits_clutter
from sasa_jax.data.sklearn_digits import digits_split

DIGITS_SIZE = 32
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": "train", "test": "test", "validation": "test"}


def _digit_info(builder, description: str, size: int) -> tfds.core.DatasetInfo:
    """A 10-class dataset of ``size x size`` RGB images."""
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(size, size, 3)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        ),
        supervised_keys=("image", "label"),
    )


class SasaDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits as 32x32 RGB images, 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return _digit_info(
            self, "scikit-learn's handwritten digits (UCI), upsampled to 32x32 RGB.", DIGITS_SIZE
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded: the data ship inside scikit-learn
        return {
            "train": self._generate_examples(test=False),
            "test": self._generate_examples(test=True),
        }

    def _generate_examples(self, test: bool):
        indices, images, labels = digits_split(test)
        for index, pixels, label in zip(indices, images, labels, strict=True):
            gray = np.clip(pixels * 255.0, 0, 255).astype(np.uint8)
            image = Image.fromarray(gray).resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR)
            yield int(index), {"image": image.convert("RGB"), "label": int(label)}


class SasaDigitsClutter(tfds.core.GeneratorBasedBuilder):
    """Cluttered digits (``digits_clutter``): one scaled-up digit among fragments of others,
    48x48 RGB, 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        description = "scikit-learn's digits scaled up among clutter fragments (sasa_jax)."
        return _digit_info(self, description, digits_clutter.CANVAS)

    def _split_generators(self, dl_manager):
        del dl_manager  # generated offline from the digits inside scikit-learn
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str):
        for index, (gray, label) in enumerate(digits_clutter.cluttered_digits(split)):
            yield index, {"image": Image.fromarray(gray).convert("RGB"), "label": label}


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _classes(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_layout(folder: str | os.PathLike, test_percent: int = 10):
    """``(classes, {"train": [(path, class)], "test": [...]})`` for an image folder.

    Raises FileNotFoundError for a missing folder and ValueError for one without classes.
    """
    root = pathlib.Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; expected "
            "DIR/<class>/*.jpg or DIR/{train,test}/<class>/*.jpg"
        )
    top = _classes(root)
    split_dirs = {name: root / name for name in top if name in SPLIT_FOLDERS}
    files: dict[str, list[tuple[pathlib.Path, str]]] = {"train": [], "test": []}
    if "train" in split_dirs and len(split_dirs) > 1:
        classes = _classes(split_dirs["train"])
        for name, path in split_dirs.items():
            for label in _classes(path):
                if label not in classes:
                    raise ValueError(f"class {label!r} in {path} is not in {root / 'train'}")
                files[SPLIT_FOLDERS[name]] += [(f, label) for f in _image_files(path / label)]
    else:
        classes = top
        for label in classes:
            for f in _image_files(root / label):
                digest = hashlib.md5(str(f.relative_to(root)).encode()).digest()
                split = (
                    "test" if int.from_bytes(digest[:4], "big") % 100 < test_percent else "train"
                )
                files[split].append((f, label))
    if not classes or not files["train"]:
        raise ValueError(
            f"no images found in class folders under {root}; expected "
            "DIR/<class>/*.jpg or DIR/{train,test}/<class>/*.jpg"
        )
    return classes, files


def folder_fingerprint(files: dict[str, list[tuple[pathlib.Path, str]]]) -> str:
    """Hash of every file's path, size and mtime: a changed folder gets a fresh build."""
    digest = hashlib.sha1()
    for split in sorted(files):
        for path, label in files[split]:
            stat = path.stat()
            digest.update(f"{split}|{label}|{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def load_rgb(path: pathlib.Path) -> Image.Image | str:
    """The image as RGB, or the reason Pillow cannot read it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return str(error) or type(error).__name__


class SasaImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images in class folders. Construct with ``folder=``; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, folder: str | os.PathLike, test_percent: int = 10, **kwargs):
        self._folder = pathlib.Path(folder).expanduser().resolve()
        self._classes, self._files = folder_layout(self._folder, test_percent)
        self.unreadable: list[tuple[pathlib.Path, str]] = []  # filled while building
        name = "".join(c if c.isalnum() else "_" for c in self._folder.name.lower())
        config = tfds.core.BuilderConfig(name=f"{name}_{folder_fingerprint(self._files)}")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images from {self._folder}",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=self._classes),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            split: self._generate_examples(split)
            for split in ("train", "test")
            if self._files[split]
        }

    def _generate_examples(self, split: str):
        for path, label in self._files[split]:
            image = load_rgb(path)
            if isinstance(image, str):
                self.unreadable.append((path, image))
                continue
            name = str(path.relative_to(self._folder))
            yield name, {"image": image, "label": label, "file_name": name}
