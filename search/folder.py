"""A user's own image folder (a directory or a .zip) -> uint8 tensors, decoded once, cached on disk.

Layouts; in a zip everything may also sit in one top-level folder (``myset/train/cat/1.jpg``):

    <root>/<class>/<image>                      test carved per class (test_fraction, split_seed)
    <root>/{train,test}/<class>/<image>         the folder's own split
    <root>/train/<class>/<image>, no test/      train/ is the whole set, test carved as above

``test/`` without ``train/`` is an error. Images deeper inside a class folder count (as in
torchvision's ImageFolder); images directly in <root>, non-image files, hidden files (.DS_Store)
and __MACOSX/ are ignored. Each image goes through PIL ``convert("L" | "RGB")`` (alpha dropped),
a center crop to a square on its shorter side (keeps the aspect ratio instead of squashing) and a
bilinear resize to image_size x image_size (Pillow's filter antialiases when shrinking; big JPEGs
are first shrunk by libjpeg's DCT scaling). Big sets decode in a process pool. Tensors are cached
under cache_dir, $CNNSEARCH_CACHE/folders or ~/.cache/cnnsearch/folders (never in the image
folder), keyed by path, folder signature and arguments: later trials and workers load in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from search.data import DataError  # data.py imports this module lazily, so no cycle

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_KINDS = "PNG, JPEG, BMP or WebP"
_LAYOUT = "expected <root>/<class>/<image> or <root>/train/<class>/<image> + <root>/test/<class>/<image>"
_CACHE_VERSION = 1  # part of the cache key: bump when decoding or the file's contents change
_POOL_MIN = 2000  # below this many images a process pool costs more (start-up, pickling) than it saves
_CHUNK = 500  # images per pool task: pickling overhead stays small, work still spreads over cores


class FolderError(DataError):
    """A problem with a user's image folder; the message is one line naming the path."""


class FolderData(NamedTuple):
    """Decoded images: x uint8 [N, C, H, W], y int64 [N], classes sorted by name."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    skipped: int  # unreadable image files left out (only with strict=False)


class FolderListing(NamedTuple):
    """What `load_folder` decodes: file names relative to the folder (or inside the zip), labels."""

    classes: tuple[str, ...]
    train_files: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_files: tuple[str, ...]
    test_labels: tuple[int, ...]
    own_split: bool  # True when the folder brings its own train/ and test/


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
        strict: raise on the first unreadable image instead of skipping it.
        cache_dir: where decoded tensors are cached (see the module docstring for the default).
        workers: decoding processes (default os.cpu_count()); 1 decodes in this process.

    Returns:
        FolderData: train = everything that is not test; ``skipped`` counts unreadable files.

    Raises:
        FolderError: bad arguments or folder (missing, empty, wrong layout, an empty class
            folder, an unreadable image with strict=True); the message names the path.

    Example:
        >>> load_folder("~/pets.zip", image_size=64).train_x.shape  # doctest: +SKIP
        torch.Size([900, 3, 64, 64])
    """
    root = _check_args(path, image_size, channels, test_fraction)
    key = {"v": _CACHE_VERSION, "path": str(root), "signature": _signature(root),
           "image_size": image_size, "channels": channels, "test_fraction": test_fraction,
           "split_seed": split_seed, "strict": strict}
    cache_file = _cache_file(root, cache_dir, key)
    cached = _read_cache(cache_file)
    if cached is not None:
        return cached
    listing = list_folder(root, test_fraction=test_fraction, split_seed=split_seed)
    names = listing.train_files + listing.test_files
    x, bad = _decode_all(root, list(names), image_size, channels, workers)
    if bad and strict:
        raise FolderError(f"unreadable image {root}/{names[bad[0][0]]}: {' '.join(bad[0][1].split())}")
    keep = torch.ones(len(names), dtype=torch.bool)
    keep[[index for index, _ in bad]] = False
    n_train = len(listing.train_files)
    if not keep[:n_train].any():
        raise FolderError(f"no readable training images in {root} ({len(bad)} unreadable)")
    x, y = torch.from_numpy(x), torch.tensor(listing.train_labels + listing.test_labels)
    train, test = keep[:n_train].nonzero()[:, 0], n_train + keep[n_train:].nonzero()[:, 0]
    data = FolderData(x[train], y[train], x[test], y[test], listing.classes, len(bad))
    _write_cache(cache_file, data)
    return data


def list_folder(path, *, test_fraction: float = 0.1, split_seed: int = 0) -> FolderListing:
    """Classes, files and train/test split of a folder or zip, found without decoding an image.

    Arguments and errors as in `load_folder`; files come grouped by class, each group sorted.
    """
    root = _check_args(path, 1, 1, test_fraction)
    images, dirs = _entries(root)
    if not images:
        raise FolderError(f"{root} contains no image files ({_KINDS})")
    wrap = _wrapper(images)
    tops = {d[len(wrap):] for d in dirs if d.startswith(wrap) and "/" not in d[len(wrap):]}
    if {"train", "test"} & tops:
        others = sorted({p[len(wrap):].split("/")[0] for p in images if p[len(wrap):].count("/")}
                        - {"train", "test"})
        if others:
            raise FolderError(f"{root} has {others[0]}/ beside train/ and test/; {_LAYOUT}")
        if "train" not in tops:
            raise FolderError(f"{root} has test/ but no train/; {_LAYOUT}")
        train = _by_class(root, images, dirs, wrap + "train/")
        test = _by_class(root, images, dirs, wrap + "test/") if "test" in tops else None
    else:
        train, test = _by_class(root, images, dirs, wrap), None
    if len(train) < 2:
        raise FolderError(f"{root} has only one class folder ({next(iter(train))}); {_LAYOUT}")
    if test is not None:
        extra = sorted(set(test) - set(train))
        if extra:
            raise FolderError(f"{root} has test/{extra[0]} but no train/{extra[0]}")
    else:
        train, test = _stratified_split(train, test_fraction, split_seed)
    classes, columns = tuple(sorted(train)), []
    for split in (train, test):
        pairs = [(f, y) for y, c in enumerate(classes) for f in sorted(split.get(c, ()))]
        columns += [tuple(f for f, _ in pairs), tuple(y for _, y in pairs)]
    return FolderListing(classes, *columns, own_split="test" in tops)


def _check_args(path, image_size, channels, test_fraction) -> Path:
    if channels not in (1, 3):
        raise FolderError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise FolderError(f"image_size must be a positive integer, got {image_size!r}")
    if not 0 < test_fraction < 1:
        raise FolderError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}")
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise FolderError(f"image folder {root} does not exist")
    if not (root.is_dir() or zipfile.is_zipfile(root)):
        raise FolderError(f"{root} is neither a directory nor a readable .zip file")
    return root


def _junk(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _entries(root: Path) -> tuple[list[str], set[str]]:
    """Image files and folders below root (posix, relative), hidden files and __MACOSX left out."""
    files, dirs = [], set()
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = Path(dirpath).relative_to(root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            dirnames[:] = [d for d in dirnames if not _junk(d)]
            dirs.update(prefix + d for d in dirnames)
            files += [prefix + f for f in filenames if not _junk(f)]
    else:
        for name in _open_zip(str(root)).namelist():
            if any(_junk(part) for part in name.split("/")):
                continue
            if name.endswith("/"):
                dirs.add(name.rstrip("/"))
            else:
                files.append(name)
    # parents of non-image files count too: a class folder holding only notes.txt has no images
    for f in files:
        parts = f.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(f for f in files if f.lower().endswith(IMAGE_SUFFIXES)), dirs


def _wrapper(images: list[str]) -> str:
    """The one top-level folder every image sits in (``myset/``), or "" when there is none."""
    tops = {p.split("/", 1)[0] for p in images}
    if len(tops) == 1 and all(p.count("/") >= 2 for p in images) and tops.isdisjoint({"train", "test"}):
        return tops.pop() + "/"
    return ""


def _by_class(root: Path, images: list[str], dirs: set[str], prefix: str) -> dict[str, list[str]]:
    depth = prefix.count("/")
    found: dict[str, list[str]] = {}
    for p in images:
        parts = p.split("/")
        if p.startswith(prefix) and len(parts) >= depth + 2:
            found.setdefault(parts[depth], []).append(p)
    for d in sorted(dirs):
        if d.startswith(prefix) and d.count("/") == depth and d[len(prefix):] not in found:
            raise FolderError(f"class folder {root}/{d} contains no images ({_KINDS})")
    if not found:
        where = f"{root}/{prefix}".rstrip("/")
        raise FolderError(f"{where} has no class folders with images; {_LAYOUT}")
    return found


def _stratified_split(by_class: dict[str, list[str]], fraction: float, seed: int):
    train, test = {}, {}
    for c, files in by_class.items():
        files = sorted(files)
        # every class with 2+ images lands in both splits, however small test_fraction is
        k = min(len(files) - 1, max(1, round(len(files) * fraction)))
        # seeded per class, so adding a class leaves the other classes' splits as they were
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(c.encode()))
        order = torch.randperm(len(files), generator=g).tolist()
        test[c] = [files[i] for i in order[:k]]
        train[c] = [files[i] for i in order[k:]]
    return train, test


def _signature(root: Path) -> str:
    """Cheap fingerprint that changes when images are added, removed, replaced or touched."""
    if not root.is_dir():
        st = root.stat()
        return f"zip:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    for name in _entries(root)[0]:
        st = (root / name).stat()
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
                          tuple(d["classes"]), int(d["skipped"]))
    except Exception:  # missing, half-written by an old crash, corrupt, other format: rebuild it
        return None


def _write_cache(file: Path, data: FolderData) -> None:
    """Write to a temp file in the cache dir, then rename: readers never see a half-written cache."""
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.stem + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({**data._asdict(), "classes": list(data.classes)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except OSError as e:  # a read-only cache dir slows later loads but must not fail this one
        warnings.warn(f"could not cache decoded images at {file}: {e}", RuntimeWarning, stacklevel=3)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _decode_all(root: Path, names: list[str], size: int, channels: int, workers: int | None):
    """uint8 [len(names), C, size, size] and (index, reason) of each unreadable file."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(names) < _POOL_MIN:
        return _decode_chunk(str(root), names, size, channels)
    starts = range(0, len(names), _CHUNK)
    out = np.empty((len(names), channels, size, size), np.uint8)
    bad = []
    with ProcessPoolExecutor(min(workers, len(starts))) as pool:
        chunks = (names[s:s + _CHUNK] for s in starts)
        for s, (arr, errors) in zip(starts, pool.map(_decode_chunk, repeat(str(root)), chunks,
                                                      repeat(size), repeat(channels))):
            out[s:s + len(arr)] = arr
            bad += [(s + i, reason) for i, reason in errors]
    return out, bad


def _open_zip(path: str) -> zipfile.ZipFile:
    st = os.stat(path)  # a replaced zip is opened afresh; a forked worker must not share the
    # parent's file offset, so it opens its own
    return _open_zip_cached(path, st.st_size, st.st_mtime_ns, os.getpid())


@functools.lru_cache(maxsize=1)
def _open_zip_cached(path: str, size: int, mtime_ns: int, pid: int) -> zipfile.ZipFile:
    # the central directory (60k entries for CIFAR-10) is read once per process, not once per chunk
    return zipfile.ZipFile(path)


def _decode_chunk(root: str, names: list[str], size: int, channels: int):
    """Decode files of a directory or zip; runs in pool workers, so it takes only plain values."""
    out = np.zeros((len(names), channels, size, size), np.uint8)
    bad = []
    is_zip = not os.path.isdir(root)
    zf = _open_zip(root) if is_zip else None
    for i, name in enumerate(names):
        try:
            data = zf.read(name) if is_zip else Path(root, name).read_bytes()
            out[i] = _decode_one(data, size, channels)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            bad.append((i, f"{type(e).__name__}: {e}"))
    return out, bad


def _decode_one(data: bytes, size: int, channels: int) -> np.ndarray:
    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data)) as img:
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
