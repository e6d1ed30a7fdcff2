"""search/datasets/folder.py: image folders and zips -> uint8 tensors, split, cache, bad input."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from search.datasets import _folder_layout, folder
from search.datasets.folder import FolderError, list_folder, load_folder
from search.errors import CnnsearchError, DataError

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
COLORS = {"cat": (200, 0, 0), "dog": (0, 200, 0), "bird": (0, 0, 200)}  # distinct in gray too
# mixed formats and sizes, non-square ones, one grayscale image per class
FILES = [("a.png", (20, 20), "RGB"), ("b.jpg", (40, 30), "RGB"), ("c.bmp", (32, 32), "RGB"),
         ("d.png", (16, 24), "L"), ("e.webp", (24, 24), "RGB"), ("f.jpeg", (64, 48), "RGB")]


def write_images(class_dir: Path, cls: str, files=FILES) -> None:
    class_dir.mkdir(parents=True, exist_ok=True)
    for name, size, mode in files:
        Image.new("RGB", size, COLORS[cls]).convert(mode).save(class_dir / name)


def make_tree(root: Path, split: bool = False) -> Path:
    for cls in COLORS:
        if split:
            write_images(root / "train" / cls, cls, FILES[:4])
            write_images(root / "test" / cls, cls, FILES[4:])
        else:
            write_images(root / cls, cls)
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0\1")
    return root


def zip_tree(tree: Path, zip_path: Path, top: str = "") -> Path:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for f in sorted(tree.rglob("*")):
            zf.write(f, top + f.relative_to(tree).as_posix())
        zf.writestr(top + "__MACOSX/cat/._a.png", b"resource fork")
    return zip_path


def load(path, tmp_path, **kw):
    return load_folder(path, cache_dir=tmp_path / "cache", **kw)


def listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted((p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "images")


@pytest.fixture
def decode_calls(monkeypatch):
    calls = []
    real = folder._decode_chunk

    def counting(*args):
        calls.append(len(args[1]))
        return real(*args)

    monkeypatch.setattr(folder, "_decode_chunk", counting)
    return calls


def test_directory_layout_gives_uint8_tensors_sorted_classes_and_a_stratified_test(tree, tmp_path):
    d = load(tree, tmp_path, image_size=8)
    assert d.classes == ("bird", "cat", "dog")
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert d.train_x.shape[1:] == (3, 8, 8) and d.test_x.shape[1:] == (3, 8, 8)
    assert len(d.train_x) + len(d.test_x) == 18 and d.skipped == 0  # junk files ignored
    assert torch.bincount(d.test_y, minlength=3).tolist() == [1, 1, 1]  # every class in test
    assert torch.bincount(d.train_y, minlength=3).tolist() == [5, 5, 5]


def test_labels_match_class_folders_in_gray_and_rgb(tree, tmp_path):
    gray = load(tree, tmp_path, channels=1, image_size=5)
    assert gray.train_x.shape[1:] == (1, 5, 5)
    luma = torch.tensor([round(0.299 * r + 0.587 * g + 0.114 * b) for r, g, b in
                         (COLORS[c] for c in gray.classes)])
    for x, y in zip(torch.cat([gray.train_x, gray.test_x]), torch.cat([gray.train_y, gray.test_y])):
        assert (x.float().mean() - luma[y]).abs() < 6
    rgb = load(tree, tmp_path, channels=3, image_size=5)
    for label, cls in enumerate(rgb.classes):
        mean = rgb.train_x[rgb.train_y == label].float().mean(dim=(0, 2, 3))
        assert mean.argmax() == max(range(3), key=lambda i: COLORS[cls][i])


def test_non_square_images_are_center_cropped(tmp_path):
    wide = Image.new("RGB", (60, 20), (255, 255, 255))
    wide.paste(Image.new("RGB", (20, 20), COLORS["cat"]), (20, 0))  # class colour only in the middle
    wide.save(tmp_path / "wide.png")
    x = folder._decode_one((tmp_path / "wide.png").read_bytes(), 10, 3)
    assert x.shape == (3, 10, 10) and x[0].min() > 190 and x[1:].max() < 10  # no white from the sides


def test_train_test_layout_uses_the_folders_own_split(tmp_path):
    d = load(make_tree(tmp_path / "images", split=True), tmp_path, image_size=12)
    assert d.classes == ("bird", "cat", "dog")
    assert torch.bincount(d.train_y).tolist() == [4, 4, 4]
    assert torch.bincount(d.test_y).tolist() == [2, 2, 2]
    assert list_folder(tmp_path / "images").own_split


def test_train_without_test_is_split_like_a_plain_folder(tmp_path):
    root = make_tree(tmp_path / "images", split=True)
    for f in (root / "test").rglob("*.*"):
        f.unlink()
    for d in sorted((root / "test").rglob("*"), reverse=True) + [root / "test"]:
        d.rmdir()
    lst = list_folder(root)
    assert not lst.own_split and set(lst.test_labels) == {0, 1, 2} and len(lst.train_files) == 9


@pytest.mark.parametrize("top", ["", "myset/"])
def test_zip_gives_the_same_tensors_as_the_directory(tmp_path, top):
    root = make_tree(tmp_path / "images", split=True)
    z = zip_tree(root, tmp_path / "images.zip", top)
    a, b = load(root, tmp_path, image_size=9), load(z, tmp_path, image_size=9)
    assert a.classes == b.classes
    for u, v in zip(a[:4], b[:4]):
        assert torch.equal(u, v)


def test_split_is_deterministic_and_depends_on_the_seed(tree):
    first = list_folder(tree, split_seed=0)
    assert list_folder(tree, split_seed=0) == first
    assert any(list_folder(tree, split_seed=s).test_files != first.test_files for s in (1, 2, 3))
    assert not set(first.test_files) & set(first.train_files)


def test_second_load_reads_the_cache_outside_the_image_folder(tree, tmp_path, decode_calls):
    before = listing(tree)
    a = load(tree, tmp_path)
    b = load(tree, tmp_path)
    assert len(decode_calls) == 1
    assert all(torch.equal(u, v) for u, v in zip(a[:4], b[:4])) and a[4:] == b[4:]
    assert listing(tree) == before
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_cache_is_invalidated_when_a_file_is_added_or_touched(tree, tmp_path, decode_calls):
    n = len(load(tree, tmp_path).train_x)
    write_images(tree / "dog", "dog", [("new.png", (10, 10), "RGB")])
    assert len(load(tree, tmp_path).train_x) == n + 1 and len(decode_calls) == 2
    os.utime(tree / "cat" / "a.png", ns=(1, 10**18))
    load(tree, tmp_path)
    assert len(decode_calls) == 3
    load(tree, tmp_path, image_size=16)  # other arguments, other cache entry
    assert len(decode_calls) == 4


def test_corrupt_cache_is_ignored_and_rebuilt(tree, tmp_path, decode_calls):
    good = load(tree, tmp_path)
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # as if a writer had been cut off
    assert torch.equal(load(tree, tmp_path).train_x, good.train_x) and len(decode_calls) == 2
    assert load(tree, tmp_path).skipped == 0 and len(decode_calls) == 2


def test_unwritable_cache_warns_and_still_loads(tree, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")  # works as root too, unlike chmod
    with pytest.warns(RuntimeWarning, match="could not cache decoded images"):
        d = load_folder(tree, cache_dir=blocker / "cache")
    assert len(d.train_x) + len(d.test_x) == 18

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.warns(RuntimeWarning, match="No space left"):
        assert len(load(tree, tmp_path).train_x) == len(d.train_x)
    assert list((tmp_path / "cache").iterdir()) == []  # the half-written file was removed


def test_default_cache_dir_comes_from_the_environment(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNSEARCH_CACHE", str(tmp_path / "env"))
    load_folder(tree)
    assert len(list((tmp_path / "env" / "folders").glob("images-*.pt"))) == 1
    with pytest.raises(FolderError, match="inside the image folder"):
        load_folder(tree, cache_dir=tree / "cache")


@pytest.mark.parametrize("as_zip", [False, True])
def test_process_pool_gives_the_same_result(tree, tmp_path, monkeypatch, as_zip):
    path = zip_tree(tree, tmp_path / "images.zip") if as_zip else tree
    one = load(path, tmp_path / "a", workers=1)
    monkeypatch.setattr(folder, "_POOL_MIN", 0)
    monkeypatch.setattr(folder, "_CHUNK", 1)  # many tasks: workers read the zip at once
    two = load(path, tmp_path / "b", workers=2)
    assert two.skipped == 0 and all(torch.equal(u, v) for u, v in zip(one[:4], two[:4]))


def test_truncated_image_is_skipped_and_counted_or_an_error_when_strict(tree, tmp_path):
    data = (tree / "dog" / "b.jpg").read_bytes()
    (tree / "dog" / "b.jpg").write_bytes(data[: len(data) // 2])
    d = load(tree, tmp_path)
    assert d.skipped == 1 and len(d.train_x) + len(d.test_x) == 17
    assert torch.bincount(torch.cat([d.train_y, d.test_y])).tolist() == [6, 6, 5]
    with pytest.raises(FolderError, match=r"unreadable image .*dog/b\.jpg"):
        load(tree, tmp_path, strict=True)


def expect_error(path, match, **kw):
    with pytest.raises(FolderError, match=match) as info:
        load_folder(path, cache_dir=Path(path).parent / "cache", **kw)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_empty_folders(tmp_path):
    expect_error(tmp_path / "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    expect_error(tmp_path / "empty", "contains no image files")
    (tmp_path / "file.txt").write_text("hi")
    expect_error(tmp_path / "file.txt", "neither a directory nor a readable .zip file")


def test_class_folder_without_images(tree):
    (tree / "fish").mkdir()
    (tree / "fish" / ".DS_Store").write_bytes(b"")
    expect_error(tree, "class folder .*fish contains no images")


def test_zip_not_in_the_layout_says_what_was_expected(tmp_path):
    write_images(tmp_path / "flat", "cat", FILES[:2])
    with zipfile.ZipFile(tmp_path / "flat.zip", "w") as zf:  # images but no class folders
        for f in (tmp_path / "flat").iterdir():
            zf.write(f, f.name)
    expect_error(tmp_path / "flat.zip", "no class folders.*expected <root>/<class>/<image>")


def test_test_without_train_and_mixed_layouts(tmp_path):
    root = make_tree(tmp_path / "images", split=True)
    (root / "train").rename(tmp_path / "elsewhere")
    expect_error(root, "has test/ but no train/; expected")
    (tmp_path / "elsewhere").rename(root / "train")
    write_images(root / "dog", "dog", FILES[:1])
    expect_error(root, "has dog/ beside train/ and test/")


def test_bad_arguments(tree):
    assert issubclass(FolderError, DataError) and issubclass(FolderError, CnnsearchError)
    for kw, match in [({"channels": 2}, "channels must be 1"), ({"image_size": 0}, "image_size"),
                      ({"test_fraction": 1.0}, "test_fraction")]:
        with pytest.raises(FolderError, match=match):
            load_folder(tree, **kw)


def test_cifar10_jpeg_zip_layout_and_a_decoded_sample(shared_datasets):
    # listing only (not 60k decodes) keeps this quick; a few images are decoded for real
    zip_path = shared_datasets / "cifar10-jpeg" / "cifar10-jpeg.zip"
    if not zip_path.is_file():
        pytest.skip(f"CIFAR-10 JPEG zip not found at {zip_path} (see shared/datasets/SOURCES.md)")
    lst = list_folder(zip_path)
    assert lst.classes == CIFAR_CLASSES and lst.own_split
    assert torch.bincount(torch.tensor(lst.train_labels)).tolist() == [5000] * 10
    assert torch.bincount(torch.tensor(lst.test_labels)).tolist() == [1000] * 10
    sample = list(lst.test_files[::1000])
    x, bad = folder._decode_chunk(str(zip_path.resolve()), sample, 32, 3)
    assert bad == [] and x.shape == (10, 3, 32, 32) and all(img.std() > 5 for img in x)


# --- what is read stays within bounds (issue 14): size and pixel limits, links, blank names ---

MiB = 2**20


def zip_with(tmp_path, extra: dict[str, int], name="pets.zip") -> Path:
    """The test tree zipped, plus entries name -> that many zero bytes (streamed: little memory)."""
    path = zip_tree(make_tree(tmp_path / "images"), tmp_path / name)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        for entry, size in extra.items():
            with zf.open(entry, "w") as f:
                for _ in range(size // MiB):
                    f.write(bytes(MiB))
    return path


def peak_python_memory(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_zip_entry_over_the_size_limit_is_skipped_unread_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "MAX_FILE_BYTES", MiB)
    z = zip_with(tmp_path, {"cat/bomb.png": 32 * MiB, "dog/big.jpg": 2 * MiB})  # both zip to ~32 KiB
    assert z.stat().st_size < MiB
    d, peak = peak_python_memory(lambda: load(z, tmp_path))
    assert peak < 8 * MiB  # the entries were never inflated (before: 32 MiB and more)
    assert d.skipped == 2 and len(d.train_y) + len(d.test_y) == 18
    assert d.skipped_reasons == ("cat/bomb.png: 32 MiB unpacked, over the 1 MiB limit per file",
                                 "dog/big.jpg: 2 MiB unpacked, over the 1 MiB limit per file")
    assert d.skipped_line(str(z)) == (f"skipped 2 of 20 image files in {z} (first: cat/bomb.png: "
                                      "32 MiB unpacked, over the 1 MiB limit per file; 1 more)")
    with pytest.raises(FolderError, match=r"unreadable image .*cat/bomb\.png: 32 MiB unpacked, over the 1 MiB"):
        load(z, tmp_path, strict=True)


def test_zip_header_that_lies_about_the_size_cannot_inflate_past_it(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "MAX_FILE_BYTES", MiB)
    z = zip_with(tmp_path, {"cat/liar.png": 32 * MiB})
    raw, name = bytearray(z.read_bytes()), b"cat/liar.png"
    # its local header and central directory entry both declare 1000 bytes for the 32 MiB of zeros
    for header, sig, size_at in ((raw.index(name) - 30, b"PK\x03\x04", 22), (raw.rindex(name) - 46, b"PK\x01\x02", 24)):
        assert raw[header:header + 4] == sig
        raw[header + size_at:header + size_at + 4] = (1000).to_bytes(4, "little")
    z.write_bytes(bytes(raw))
    assert zipfile.ZipFile(z).getinfo("cat/liar.png").file_size == 1000
    d, peak = peak_python_memory(lambda: load(z, tmp_path))
    assert peak < 8 * MiB and d.skipped == 1
    assert d.skipped_reasons == ("cat/liar.png: BadZipFile: Bad CRC-32 for file 'cat/liar.png'",)


def test_zip_whose_images_unpack_to_too_much_is_refused_naming_both_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(_folder_layout, "MAX_ZIP_TOTAL_BYTES", 4 * MiB)
    z = zip_with(tmp_path, {f"cat/bomb{i}.png": 2 * MiB for i in range(3)})  # 6 MiB in ~60 KiB
    expect_error(z, r"its images unpack to 6 MiB, more than the 4 MiB allowed \(20x the zip's .* KiB, at least "
                    r"4 MiB\): a zip bomb")
    with pytest.raises(FolderError, match="unpack to 6 MiB"):
        list_folder(z)  # found from the zip's directory, before anything is decoded
    monkeypatch.setattr(_folder_layout, "MAX_ZIP_RATIO", 1000)  # a zip's own size counts too
    assert len(list_folder(z).classes) == 3


def png_bomb(path: Path, side: int) -> Path:
    """A real grayscale PNG of side x side black pixels: megapixels in a few KiB, made row by row."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row, idat = zlib.compressobj(9), bytes(side + 1), b""
    for _ in range(side):
        idat += z.compress(row)
    idat += z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("as_zip", [False, True])
def test_image_over_the_pixel_limit_is_skipped_before_decoding(tree, tmp_path, as_zip):
    bomb = png_bomb(tree / "cat" / "bomb.png", 8100)  # 65.6 MP: PIL alone decodes it (no warning)
    assert bomb.stat().st_size < 200_000
    path = zip_tree(tree, tmp_path / "images.zip") if as_zip else tree
    d = load(path, tmp_path)
    assert d.skipped == 1 and d.skipped_reasons == ("cat/bomb.png: 8100x8100 pixels, over the 64-megapixel limit",)
    with Image.open(bomb) as img:  # a good PNG: it is the limit that refuses it
        assert img.size == (8100, 8100)


def test_plain_file_over_the_limits_is_skipped_too(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "MAX_FILE_BYTES", MiB)
    monkeypatch.setattr(folder, "MAX_IMAGE_PIXELS", 2000)
    (tree / "dog" / "huge.bmp").write_bytes(bytes(2 * MiB))
    Image.new("RGB", (100, 30)).save(tree / "dog" / "wide.png")
    # not regular files: read whole, /dev/zero would never end and a FIFO would wait for a writer
    (tree / "bird" / "null.png").symlink_to(os.devnull)
    (tree / "bird" / "gone.png").symlink_to(tree / "nowhere.png")  # a broken link
    d = load(tree, tmp_path)
    assert d.skipped_reasons == ("bird/f.jpeg: 64x48 pixels, over the 0.002-megapixel limit",
                                 "bird/gone.png: FileNotFoundError: [Errno 2] No such file or directory: "
                                 f"'{tree}/bird/gone.png'",
                                 "bird/null.png: not a regular file",
                                 "cat/f.jpeg: 64x48 pixels, over the 0.002-megapixel limit",
                                 "dog/f.jpeg: 64x48 pixels, over the 0.002-megapixel limit",
                                 "dog/huge.bmp: 2 MiB, over the 1 MiB limit per file",
                                 "dog/wide.png: 100x30 pixels, over the 0.002-megapixel limit")
    assert d.skipped == 7 and len(d.train_y) + len(d.test_y) == 15


def test_symlink_loops_are_not_followed_and_no_image_is_listed_twice(tree, tmp_path):
    (tree / "cat" / "loop").symlink_to("..")
    (tree / "dog" / "self").symlink_to(".")
    (tree / "cat" / "alias.png").symlink_to("../dog/a.png")  # a link to dog's image: counted once, as dog's
    lst = list_folder(tree)  # before: dozens of levels deep, the same image under every class
    files = lst.train_files + lst.test_files
    real = [os.path.realpath(tree / f) for f in files]
    assert len(files) == 18 and len(set(real)) == 18
    assert not set(lst.train_files) & set(lst.test_files)
    assert all(f.count("/") == 1 for f in files) and "cat/alias.png" not in files
    d = load(tree, tmp_path)
    assert len(d.train_y) + len(d.test_y) == 18 and d.skipped == 0


def test_a_link_into_the_other_split_does_not_leak_test_images_into_train(tmp_path):
    root = make_tree(tmp_path / "images", split=True)
    (root / "train" / "cat" / "leak").symlink_to("../../test")
    (root / "train" / "dog" / "up").symlink_to("../..")
    lst = list_folder(root)
    assert (len(lst.train_files), len(lst.test_files)) == (12, 6)
    tests = {os.path.realpath(root / "test" / f) for f in lst.test_files}
    assert not tests & {os.path.realpath(root / "train" / f) for f in lst.train_files}


def test_a_folder_linked_from_outside_is_followed(tmp_path):
    root = tmp_path / "images"
    write_images(tmp_path / "elsewhere" / "owl", "cat")
    write_images(root / "dog", "dog")
    (root / "owl").symlink_to(tmp_path / "elsewhere" / "owl")
    assert list_folder(root).classes == ("dog", "owl")


def test_blank_class_names_are_errors_naming_the_path(tmp_path):
    root = make_tree(tmp_path / "images", split=True)
    z = zip_tree(root, tmp_path / "slash.zip")
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("train//x.png", (root / "train" / "cat" / "a.png").read_bytes())
    expect_error(z, r"class folder name '' is empty or blank: .*slash\.zip/train//x\.png")
    write_images(root / "train" / "  ", "cat", FILES[:1])
    expect_error(root, r"class folder name '  ' is empty or blank: .*images/train/  /a\.png")


def test_skipped_files_reach_the_dataset_and_the_train_command_as_one_warning(tree, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from search import datasets
    from search.cli import app

    (tree / "cat" / "x.png").write_text("not an image at all")
    opts = {"path": str(tree), "image_size": 8, "cache_dir": str(tmp_path / "cache")}
    ds = datasets.load_dataset("folder", options=opts)
    assert ds.skipped == 1
    assert ds.skipped_line == (f"skipped 1 of 19 image files in {tree} "
                               "(first: cat/x.png: not an image (PIL cannot identify it))")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"dataset": "folder", "data_options": opts, "epochs": 1, "batch_size": 8,
                                  "device": "cpu", "model_params": {"channels": [4], "padding": 1, "fc": [8]}}))
    result = CliRunner().invoke(app, ["train", str(config), "--no-test"])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if line.strip()] == [f"warning: {ds.skipped_line}"]
