"""A user's own image folder (a directory or a .zip) -> uint8 tensors, decoded once, cached on disk.

Layouts; in a zip everything may also sit in one top-level folder (``myset/train/cat/1.jpg``):

    <root>/<class>/<image>                      test carved per class (test_fraction, split_seed)
    <root>/{train,test}/<class>/<image>         the folder's own split
    <root>/train/<class>/<image>, no test/      train/ is the whole set, test carved as above

``test/`` without ``train/`` is an error, and so is an empty or blank class folder name (a zip
entry ``train//x.png``). Images deeper inside a class folder count (as in torchvision's
ImageFolder); images directly in <root>, files without an image suffix, hidden files (.DS_Store)
and __MACOSX/ are ignored. Symlinks are followed, but each real folder and file is listed once
(a loop such as ``cat/loop -> ..`` adds nothing; see `_folder_layout._walk`).

What is read is bounded: a file (or zip entry, unpacked) of more than MAX_FILE_BYTES or an image
of more than MAX_IMAGE_PIXELS is skipped like an unreadable one, and a zip whose images unpack to
more than `_folder_layout.MAX_ZIP_TOTAL_BYTES` (or `MAX_ZIP_RATIO` times its size) is refused.
Skipped files are counted and named: ``FolderData.skipped_reasons``, ``FolderData.skipped_line()``
(the folder dataset hands that line on as ``Dataset.skipped_line``; ``cnnsearch train`` prints it).

Each image goes through PIL ``convert("L" | "RGB")`` (alpha dropped), a center crop to a square on
its shorter side (keeps the aspect ratio instead of squashing) and a bilinear resize to
image_size x image_size (Pillow's filter antialiases when shrinking; big JPEGs are first shrunk by
libjpeg's DCT scaling). Big sets decode in a process pool. Tensors are cached
under cache_dir, $CNNSEARCH_CACHE/folders or ~/.cache/cnnsearch/folders (never in the image
folder), keyed by path, folder signature and arguments: later trials and workers load in seconds.
Finding the files, classes and split (nothing decoded) is `_folder_layout.py`'s part.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import stat
import warnings
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from search.errors import CnnsearchError, DataError
from search.files import write_atomic

from ._folder_layout import (IMAGE_SUFFIXES, FolderError, FolderListing, _check_args, _check_size, _entries,
                             _open_zip, fmt_bytes, list_folder)
from ._registry import REQUIRED, register_dataset

__all__ = ["IMAGE_SUFFIXES", "FolderData", "FolderError", "FolderListing", "list_folder", "load_folder"]

_CACHE_VERSION = 2  # part of the cache key: bump when decoding or the file's contents change
_POOL_MIN = 2000  # below this many images a process pool costs more (start-up, pickling) than it saves
_CHUNK = 500  # images per pool task: pickling overhead stays small, work still spreads over cores

# Bounds on what one image may cost; a file over either is skipped and counted, never read whole.
# 256 MiB is an uncompressed 8-bit RGBA BMP at the pixel limit, so no image the pixel limit lets
# through is refused for its bytes, while a zip entry that unpacks to gigabytes (a zip bomb) is
# refused from its header and read with this cap, so a header that lies cannot inflate past it.
# Each decoding process holds at most this plus the decoded pixels.
MAX_FILE_BYTES = 256 * 2**20
# 64 megapixels: above any camera photo a CNN search would train on (PIL's own default, 89 MP,
# only warns, and errors at twice that); 64 MP decode to 192 MB of RGB. Checked from the image's
# header before its pixels are decoded, so a small PNG declaring 20000x20000 costs nothing.
MAX_IMAGE_PIXELS = 64_000_000


class FolderData(NamedTuple):
    """Decoded images: x uint8 [N, C, H, W], y int64 [N], classes sorted by name."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    skipped: int  # image files left out (only with strict=False): unreadable, not an image, over a limit
    skipped_reasons: tuple[str, ...] = ()  # one "cat/x.png: why" per skipped file, sorted by name

    def skipped_line(self, where: str = "") -> str:
        """One line for the user, "" when nothing was skipped, e.g.
        ``skipped 3 of 120 image files in pets.zip (first: cat/x.png: not an image; 2 more)``."""
        if not self.skipped:
            return ""
        total = len(self.train_y) + len(self.test_y) + self.skipped
        line = f"skipped {self.skipped} of {total} image files" + (f" in {where}" if where else "")
        if self.skipped_reasons:
            more = f"; {self.skipped - 1} more" if self.skipped > 1 else ""
            line += f" (first: {self.skipped_reasons[0]}{more})"
        return line


def load_folder(path, *, image_size: int = 32, channels: int = 3, test_fraction: float = 0.1,
                split_seed: int = 0, strict: bool = False, cache_dir=None, workers: int | None = None
                ) -> FolderData:
    """Load an image folder or .zip as uint8 tensors, from the cache when nothing changed.

    Args:
        path: a directory or .zip in one of the layouts in this module's docstring.
        image_size: every image becomes image_size x image_size (center crop, bilinear resize).
        channels: 1 (grayscale, PIL "L") or 3 (RGB).
        test_fraction: share of each class held out as test when the folder has no test/.
        split_seed: seed of that stratified split; the same seed gives the same split.
        strict: raise on the first unreadable (or over-limit) image instead of skipping it.
        cache_dir: where decoded tensors are cached (see the module docstring for the default).
        workers: decoding processes (default os.cpu_count()); 1 decodes in this process.

    Returns:
        FolderData: train = everything that is not test; ``skipped`` counts the files left out
        (unreadable, not an image, over MAX_FILE_BYTES or MAX_IMAGE_PIXELS), ``skipped_reasons``
        says why, ``skipped_line()`` sums it up in one line.

    Raises:
        FolderError: bad arguments or folder (missing, empty, wrong layout, an empty class
            folder, a blank class name, a zip whose images unpack to too much, an unreadable
            image with strict=True); the message names the path.

    Example:
        >>> load_folder("~/pets.zip", image_size=64).train_x.shape  # doctest: +SKIP
        torch.Size([900, 3, 64, 64])
    """
    root = _check_args(path, image_size, channels, test_fraction)
    key = {"v": _CACHE_VERSION, "path": str(root), "signature": _signature(root),
           "image_size": image_size, "channels": channels, "test_fraction": test_fraction,
           "split_seed": split_seed, "strict": strict, "limits": [MAX_FILE_BYTES, MAX_IMAGE_PIXELS]}
    cache_file = _cache_file(root, cache_dir, key)
    cached = _read_cache(cache_file)
    if cached is not None:
        return cached
    listing = list_folder(root, test_fraction=test_fraction, split_seed=split_seed)
    names = listing.train_files + listing.test_files
    x, bad = _decode_all(root, list(names), image_size, channels, workers)
    bad.sort()
    if bad and strict:
        raise FolderError(f"unreadable image {root}/{names[bad[0][0]]}: {' '.join(bad[0][1].split())}")
    keep = torch.ones(len(names), dtype=torch.bool)
    keep[[index for index, _ in bad]] = False
    n_train = len(listing.train_files)
    if not keep[:n_train].any():
        raise FolderError(f"no readable training images in {root} ({len(bad)} unreadable)")
    x, y = torch.from_numpy(x), torch.tensor(listing.train_labels + listing.test_labels)
    train, test = keep[:n_train].nonzero()[:, 0], n_train + keep[n_train:].nonzero()[:, 0]
    data = FolderData(x[train], y[train], x[test], y[test], listing.classes, len(bad),
                      tuple(sorted(f"{names[i]}: {reason}" for i, reason in bad)))
    _write_cache(cache_file, data)
    return data


def _signature(root: Path) -> str:
    """Cheap fingerprint that changes when images are added, removed, replaced or touched."""
    if not root.is_dir():
        st = root.stat()
        return f"zip:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    for name in _entries(root)[0]:
        try:
            st = (root / name).stat()
        except OSError:  # a broken link: skipped when decoded, but it must not stop the load here
            st = (root / name).lstat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "dir:" + h.hexdigest()


def _cache_file(root: Path, cache_dir, key: dict) -> Path:
    if cache_dir is None:
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnsearch"
        cache_dir = Path(os.environ.get("CNNSEARCH_CACHE") or home) / "folders"
    cache_dir = Path(cache_dir).expanduser().resolve()
    if root.is_dir() and cache_dir.is_relative_to(root):
        raise FolderError(f"cache directory {cache_dir} is inside the image folder {root}; "
                          "point cache_dir or CNNSEARCH_CACHE elsewhere")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / f"{root.stem}-{digest}.pt"


def _read_cache(file: Path) -> FolderData | None:
    try:
        d = torch.load(file, weights_only=True)
        return FolderData(d["train_x"], d["train_y"], d["test_x"], d["test_y"],
                          tuple(d["classes"]), int(d["skipped"]), tuple(d["skipped_reasons"]))
    except Exception:  # missing, half-written by an old crash, corrupt, other format: rebuild it
        return None


def _write_cache(file: Path, data: FolderData) -> None:
    """Write the cache atomically; a read-only cache dir slows later loads but must not fail this one."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file, lambda f: torch.save({**data._asdict(), "classes": list(data.classes),
                                                 "skipped_reasons": list(data.skipped_reasons)}, f))
    except (OSError, CnnsearchError) as e:  # CnnsearchError: the cache path is a directory
        warnings.warn(f"could not cache decoded images at {file}: {e}", RuntimeWarning, stacklevel=3)


def _decode_all(root: Path, names: list[str], size: int, channels: int, workers: int | None):
    """uint8 [len(names), C, size, size] and (index, reason) of each unreadable file."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    limits = (MAX_FILE_BYTES, MAX_IMAGE_PIXELS)  # passed on: a spawned worker would not see a changed value
    if workers <= 1 or len(names) < _POOL_MIN:
        return _decode_chunk(str(root), names, size, channels, limits)
    starts = range(0, len(names), _CHUNK)
    out = np.empty((len(names), channels, size, size), np.uint8)
    bad = []
    with ProcessPoolExecutor(min(workers, len(starts))) as pool:
        chunks = (names[s:s + _CHUNK] for s in starts)
        for s, (arr, errors) in zip(starts, pool.map(_decode_chunk, repeat(str(root)), chunks,
                                                      repeat(size), repeat(channels), repeat(limits))):
            out[s:s + len(arr)] = arr
            bad += [(s + i, reason) for i, reason in errors]
    return out, bad


class _Skip(Exception):
    """A file left out for a reason said in words (over a limit, not a regular file)."""


def _decode_chunk(root: str, names: list[str], size: int, channels: int, limits: tuple[int, int] | None = None):
    """Decode files of a directory or zip; runs in pool workers, so it takes only plain values.

    limits: (max file bytes, max image pixels), MAX_FILE_BYTES and MAX_IMAGE_PIXELS by default.
    Returns uint8 [len(names), C, size, size] and (index, reason) of each file left out.
    """
    max_bytes, max_pixels = limits or (MAX_FILE_BYTES, MAX_IMAGE_PIXELS)
    out = np.zeros((len(names), channels, size, size), np.uint8)
    bad = []
    zf = None if os.path.isdir(root) else _open_zip(root)
    for i, name in enumerate(names):
        try:
            out[i] = _decode_one(_read(root, zf, name, max_bytes), size, channels, max_pixels)
        except _Skip as e:
            bad.append((i, str(e)))
        except Image.UnidentifiedImageError:
            bad.append((i, "not an image (PIL cannot identify it)"))
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError...; zipfile BadZipFile (bad CRC)
            bad.append((i, " ".join(f"{type(e).__name__}: {e}".split())))
    return out, bad


def _read(root: str, zf, name: str, max_bytes: int) -> bytes:
    """The bytes of one file or zip entry, never more than max_bytes read (else _Skip)."""
    over = f"over the {fmt_bytes(max_bytes)} limit per file"
    if zf is not None:
        info = zf.getinfo(name)
        if info.file_size > max_bytes:  # from the header: nothing inflated
            raise _Skip(f"{fmt_bytes(info.file_size)} unpacked, {over}")
        opened, want = zf.open(info), info.file_size + 1
    else:
        path = os.path.join(root, name)
        st = os.stat(path)  # before open(): opening a FIFO would wait for a writer
        if not stat.S_ISREG(st.st_mode):  # a link to /dev/zero would never end
            raise _Skip("not a regular file")
        if st.st_size > max_bytes:
            raise _Skip(f"{fmt_bytes(st.st_size)}, {over}")
        opened, want = open(path, "rb"), max_bytes + 1
    with opened as f:
        # a zip entry is inflated no further than its header says (zipfile then checks the CRC, so
        # a header that lies fails that); a plain file may have grown since it was listed
        data = f.read(want)
    if len(data) > max_bytes:
        raise _Skip(f"more than {fmt_bytes(max_bytes)} when read, {over}")
    return data


def _decode_one(data: bytes, size: int, channels: int, max_pixels: int | None = None) -> np.ndarray:
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    mode = "L" if channels == 1 else "RGB"
    try:
        with warnings.catch_warnings():  # PIL warns above its own limit, 89 MP; ours is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's error, at twice its own limit
        raise _Skip(f"over the {max_pixels / 1e6:g}-megapixel limit ({str(e).split(', could')[0]})") from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise _Skip(f"{w}x{h} pixels, over the {max_pixels / 1e6:g}-megapixel limit")
        if min(img.size) >= 2 * size:  # JPEG only: libjpeg decodes at 1/2..1/8 scale, still >= size
            img.draft(mode, (size, size))
        img = img.convert(mode)  # loads the pixels: a truncated file raises here
    w, h = img.size
    if (w, h) != (size, size):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        # crop first: resize(box=...) would blend in pixels from just outside the box
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _check_options(options: dict) -> dict:
    if "path" not in options:
        raise DataError("options.path: the folder dataset needs the image folder's path")
    _check_size(options["image_size"], options["channels"])  # describe's shape must not be nonsense
    return options


def _num_classes(options: dict, root) -> int:
    listing = list_folder(options["path"], test_fraction=options["test_fraction"], split_seed=options["split_seed"])
    return len(listing.classes)


# Options are load_folder's keyword arguments, so the two cannot drift apart.
_OPTIONS = {name: REQUIRED if name == "path" else p.default
            for name, p in inspect.signature(load_folder).parameters.items()}


@register_dataset("folder", options=_OPTIONS, check=_check_options, path_options=("path",),
                  shape=lambda o: (o["channels"], o["image_size"], o["image_size"]), classes=_num_classes)
def _load_folder(root, download, options):
    data = load_folder(**options)  # looked up at call time, so tests can stand in for it
    line = data.skipped_line(str(options["path"])) if hasattr(data, "skipped_line") else ""
    return data.train_x, data.train_y, data.test_x, data.test_y, tuple(data.classes), data.skipped, line
