"""Image-folder layouts: which files are images, which class each is, which split it is in.

Found from names only (no image is opened), so a study can learn its classes, and `describe`
its class count, without decoding anything. The layouts themselves are described in
`search/datasets/folder.py`.
"""

from __future__ import annotations

import functools
import os
import stat
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import torch

from search.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_KINDS = "PNG, JPEG, BMP or WebP"
_LAYOUT = "expected <root>/<class>/<image> or <root>/train/<class>/<image> + <root>/test/<class>/<image>"

# A zip's images may unpack to at most the larger of these: 20x the zip's own size (JPEG, PNG and
# WebP barely compress, BMP a few times, so real sets stay far below it, ImageNet-sized zips too)
# or 16 GiB. A zip bomb declares far more (200 MB of zeros zips to 200 KB) and is refused before
# anything is inflated; each entry is also bounded when it is read (folder.MAX_FILE_BYTES).
MAX_ZIP_TOTAL_BYTES = 16 * 2**30
MAX_ZIP_RATIO = 20


class FolderError(DataError):
    """A problem with a user's image folder; the message is one line naming the path."""


class FolderListing(NamedTuple):
    """What `load_folder` decodes: file names relative to the folder (or inside the zip), labels."""

    classes: tuple[str, ...]
    train_files: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_files: tuple[str, ...]
    test_labels: tuple[int, ...]
    own_split: bool  # True when the folder brings its own train/ and test/


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


def _check_size(image_size, channels) -> None:
    if channels not in (1, 3):
        raise FolderError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise FolderError(f"image_size must be a positive integer, got {image_size!r}")


def _check_args(path, image_size, channels, test_fraction) -> Path:
    _check_size(image_size, channels)
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
    """Image files and folders below root (posix, relative), hidden files and __MACOSX left out.

    Raises:
        FolderError: a folder below root cannot be read, or a zip's images unpack to more than
            `MAX_ZIP_TOTAL_BYTES` / `MAX_ZIP_RATIO` allow.
    """
    if root.is_dir():
        files, dirs = _walk(root)
    else:
        files, dirs, unpacked = [], set(), 0
        for info in _open_zip(str(root)).infolist():
            name = info.filename
            if any(_junk(part) for part in name.split("/")):
                continue
            if name.endswith("/"):
                dirs.add(name.rstrip("/"))
            else:
                files.append(name)
                unpacked += info.file_size if name.lower().endswith(IMAGE_SUFFIXES) else 0
        packed = root.stat().st_size
        limit = max(MAX_ZIP_TOTAL_BYTES, MAX_ZIP_RATIO * packed)
        if unpacked > limit:
            raise FolderError(f"{root}: its images unpack to {fmt_bytes(unpacked)}, more than the "
                              f"{fmt_bytes(limit)} allowed ({MAX_ZIP_RATIO}x the zip's {fmt_bytes(packed)}, "
                              f"at least {fmt_bytes(MAX_ZIP_TOTAL_BYTES)}): a zip bomb or a damaged zip")
    # parents of non-image files count too: a class folder holding only notes.txt has no images
    for f in files:
        parts = f.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(f for f in files if f.lower().endswith(IMAGE_SUFFIXES)), dirs


def _walk(root: Path) -> tuple[list[str], set[str]]:
    """Files and folders below root, following symlinks but listing each real file or folder once.

    os.walk(followlinks=True) would follow a loop (``cat/loop -> ..``) dozens of levels deep and
    list the same image under several classes and on both sides of the split. Here a folder or
    file already reached (same st_dev and st_ino) is neither listed again nor entered, so a loop
    ends at once. The walk goes level by level, each level in (symlink last, path) order: an
    image counts once, at its shallowest path, and at equal depth a real file or folder wins over
    a link to it (``cat/x.png -> ../dog/y.png`` stays dog's, ``cat/alias -> ../dog`` adds nothing).
    A broken link is listed as a file, so an image one is skipped as unreadable when decoded.
    """
    files, dirs = [], set()
    seen = {_inode(root.stat())}
    level = [""]
    while level:
        found = []
        for rel in level:
            try:
                with os.scandir(root / rel) as it:
                    found += [(e.is_symlink(), rel + e.name, e) for e in it if not _junk(e.name)]
            except OSError as e:
                raise FolderError(f"cannot read folder {root / rel}: {e.strerror or e}") from None
        found.sort(key=lambda t: t[:2])
        level = []
        for _, name, entry in found:
            try:
                st = entry.stat()  # follows symlinks
            except OSError:  # a broken or looping link
                files.append(name)
                continue
            if _inode(st) in seen:
                continue
            seen.add(_inode(st))
            if stat.S_ISDIR(st.st_mode):
                dirs.add(name)
                level.append(name + "/")
            else:
                files.append(name)
    return files, dirs


def _inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def fmt_bytes(n: int) -> str:
    """2147483648 -> '2 GiB', 3 * 2**29 -> '1.5 GiB'; for messages."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"


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
            if not parts[depth].strip():  # a zip entry train//x.png, a folder named " "
                raise FolderError(f"class folder name {parts[depth]!r} is empty or blank: {root}/{p}")
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


def _open_zip(path: str) -> zipfile.ZipFile:
    st = os.stat(path)  # a replaced zip is opened afresh; a forked worker must not share the
    # parent's file offset, so it opens its own
    return _open_zip_cached(path, st.st_size, st.st_mtime_ns, os.getpid())


@functools.lru_cache(maxsize=1)
def _open_zip_cached(path: str, size: int, mtime_ns: int, pid: int) -> zipfile.ZipFile:
    # the central directory (60k entries for CIFAR-10) is read once per process, not once per chunk
    return zipfile.ZipFile(path)
