"""search/datasets: loading by name, splits, subsets, caches, device copies and the registry."""

import json
import gzip
import re
import struct
import sys
import types
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from search import datasets
from search.datasets import _common
from search.datasets import folder as folder_module
from search.datasets import mnist as mnist_module
from search.config import RunConfig

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte"]


@pytest.fixture(autouse=True)
def fresh_cache():
    datasets.clear_cache()
    yield
    datasets.clear_cache()


@pytest.fixture
def mnist_dir(shared_datasets):
    root = shared_datasets / "mnist"
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST .gz files not found under {root}")
    return root


@pytest.fixture
def mnist_links(mnist_dir, tmp_path):
    """A private data_dir whose MNIST files are links to the shared ones (nothing copied)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / f"{name}.gz").symlink_to(mnist_dir / "MNIST" / "raw" / f"{name}.gz")
    return tmp_path


def listing(root: Path) -> list:
    return sorted((str(p.relative_to(root)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*"))


def write_idx(path: Path, t: torch.Tensor) -> None:
    header = bytes([0, 0, 0x08, t.dim()]) + struct.pack(f">{t.dim()}I", *t.shape)
    path.write_bytes(header + t.to(torch.uint8).numpy().tobytes())


def test_digits_shapes_dtypes_and_pixel_range():
    ds = datasets.load_dataset("digits")
    assert ds.in_shape == (1, 8, 8) and ds.num_classes == 10
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (1294, 144, 359)
    for x, y in ((ds.train_x, ds.train_y), (ds.val_x, ds.val_y), (ds.test_x, ds.test_y)):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and len(x) == len(y)
        assert set(y.tolist()) == set(range(10))
    assert int(ds.train_x.min()) == 0 and int(ds.train_x.max()) == 255  # 0..16 scaled to 0..255
    assert len(ds.mean) == len(ds.std) == 1 and 0 < ds.mean[0] < 1 and 0 < ds.std[0] < 1


def test_digits_splits_partition_all_1797_images():
    from sklearn.datasets import load_digits

    ds = datasets.load_dataset("digits")
    every = torch.cat([ds.train_x, ds.val_x, ds.test_x]).flatten(1)
    expected = torch.from_numpy(load_digits().images).mul(255 / 16).round().to(torch.uint8).flatten(1)
    assert sorted(map(bytes, every.numpy())) == sorted(map(bytes, expected.numpy()))


def test_split_val_is_deterministic_stratified_and_disjoint():
    y = torch.arange(1000) % 7
    x = torch.arange(1000)  # images stand-in: each "image" is its own index
    tr_x, tr_y, va_x, va_y = datasets.split_val(x, y, 0.2, seed=3)
    again = datasets.split_val(x, y, 0.2, seed=3)
    other = datasets.split_val(x, y, 0.2, seed=4)
    assert torch.equal(va_x, again[2]) and torch.equal(tr_x, again[0])
    assert not torch.equal(va_x, other[2])
    assert len(va_x) == 200 and len(tr_x) == 800
    assert set(tr_x.tolist()).isdisjoint(va_x.tolist()) and set(tr_x.tolist()) | set(va_x.tolist()) == set(range(1000))
    assert torch.equal(y[va_x], va_y) and torch.equal(y[tr_x], tr_y)
    per_class = torch.bincount(va_y, minlength=7)
    assert all(abs(n - 0.2 * c) <= 1 for n, c in zip(per_class.tolist(), torch.bincount(y).tolist()))


def test_val_fraction_bounds():
    assert len(datasets.load_dataset("digits", val_fraction=0.0).val_y) == 0
    with pytest.raises(datasets.DataError, match="val_fraction"):
        datasets.load_dataset("digits", val_fraction=1.0)


def test_subset_keeps_val_and_test_fixed():
    full = datasets.load_dataset("digits")
    small = datasets.load_dataset("digits", subset=100)
    assert len(small.train_y) == 100
    assert torch.equal(small.val_x, full.val_x) and torch.equal(small.test_x, full.test_x)
    counts = torch.bincount(small.train_y, minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11  # stratified: about 10 per class
    datasets.clear_cache()
    assert torch.equal(datasets.load_dataset("digits", subset=100).train_x, small.train_x)


@pytest.mark.parametrize("subset", [0, -5, 10_000, True])
def test_bad_subset_names_the_option(subset):
    with pytest.raises(datasets.DataError, match="^subset"):
        datasets.load_dataset("digits", subset=subset)


def test_a_subset_larger_than_the_training_set_names_both_numbers():
    train = len(datasets.load_dataset("digits").train_y)
    with pytest.raises(datasets.DataError) as info:
        datasets.load_dataset("digits", subset=train + 1)
    assert f"{train + 1}" in str(info.value) and f"{train}" in str(info.value)


@pytest.mark.parametrize("name,options,fraction", [
    ("digits", None, 0.0003),  # 1438 images: 0.43 of an image rounds to none
    ("synthetic", {"n": 40, "classes": 2}, 0.01),
])
def test_a_validation_split_that_rounds_to_no_image_is_an_error(name, options, fraction):
    """Every trial would train, then crash (or score NaN) on an empty validation set."""
    with pytest.raises(datasets.DataError) as info:
        datasets.load_dataset(name, val_fraction=fraction, options=options)
    message = str(info.value)
    assert message.startswith(f"val_fraction: {fraction} of ") and "0 validation images" in message, message
    assert len(datasets.load_dataset(name, val_fraction=0.0, options=options).val_y) == 0  # 0 asks for none


@pytest.mark.parametrize("channels,size,classes", [(1, 8, 2), (3, 32, 10), (4, 12, 5)])
def test_synthetic_shapes(channels, size, classes):
    opts = {"n": 300, "classes": classes, "channels": channels, "size": size}
    ds = datasets.load_dataset("synthetic", options=opts)
    assert ds.in_shape == (channels, size, size) and ds.num_classes == classes
    assert len(ds.train_y) + len(ds.val_y) == 300 and len(ds.test_y) == 60
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert set(ds.train_y.tolist()) == set(range(classes)) and len(ds.mean) == len(ds.std) == channels


def test_synthetic_depends_on_seed():
    a = datasets.load_dataset("synthetic", options={"n": 50, "seed": 1})
    b = datasets.load_dataset("synthetic", options={"n": 50, "seed": 2})
    assert not torch.equal(a.train_x, b.train_x)


@pytest.fixture
def one_thread():
    """A tiny model trains ~10x faster on one thread when the cores are shared (no OpenMP thrashing)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_synthetic_is_learnable_by_a_small_cnn(one_thread):
    torch.manual_seed(0)
    ds = datasets.load_dataset("synthetic")
    mean, std = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    norm = lambda x: (x.float() / 255 - mean) / std  # noqa: E731
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, ds.num_classes))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(3):
        for idx in torch.randperm(len(ds.train_y)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(norm(ds.train_x[idx])), ds.train_y[idx]).backward()
            opt.step()
    with torch.no_grad():
        assert (net(norm(ds.val_x)).argmax(1) == ds.val_y).float().mean() > 0.9


@pytest.mark.parametrize("options,key", [({"size": 0}, "options.size"), ({"colour": 1}, "'colour'"),
                                         ({"n": True}, "options.n"), ({"classes": 1}, "options.classes")])
def test_bad_synthetic_options_name_the_option(options, key):
    with pytest.raises(datasets.DataError, match=key):
        datasets.load_dataset("synthetic", options=options)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(datasets.DataError, match="unknown dataset 'imagenet'.*digits, synthetic, mnist"):
        datasets.load_dataset("imagenet")


def test_options_on_a_dataset_without_options_is_an_error():
    with pytest.raises(datasets.DataError, match="digits takes no options"):
        datasets.load_dataset("digits", options={"size": 8})


def test_real_mnist_from_the_shared_folder(mnist_dir):
    before = listing(mnist_dir)
    ds = datasets.load_dataset("mnist", data_dir=mnist_dir)
    assert len(ds.train_y) + len(ds.val_y) == 60000 and len(ds.val_y) == 6000
    assert len(ds.test_y) == 10000 and ds.in_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.train_x.dtype == ds.test_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert torch.bincount(torch.cat([ds.train_y, ds.val_y])).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(ds.test_y).tolist() == MNIST_TEST_COUNTS
    assert ds.test_y[:5].tolist() == [7, 2, 1, 0, 4]  # the official test order
    # Decoded pixels reproduce the published statistics the dataset reports.
    mean, std = _common._channel_stats(torch.cat([ds.train_x, ds.val_x]))
    assert ds.mean == mean == (0.1307,) and ds.std == std == (0.3081,)
    assert listing(mnist_dir) == before


def test_loaded_once_per_process_and_nothing_written_to_data_dir(mnist_links, monkeypatch):
    before = listing(mnist_links)
    reads = []
    real = mnist_module._read_idx
    monkeypatch.setattr(mnist_module, "_read_idx", lambda path: reads.append(path) or real(path))
    first = datasets.load_dataset("mnist", data_dir=str(mnist_links))
    assert len(reads) == 4
    assert datasets.load_dataset("mnist", data_dir=mnist_links) is first
    other_split = datasets.load_dataset("mnist", data_dir=mnist_links, val_seed=1, subset=1000)
    assert other_split is not first and len(other_split.train_y) == 1000
    assert len(reads) == 4  # a different split or subset reuses the files already read
    assert listing(mnist_links) == before  # read straight from the .gz files: no unpacking, no cache files


def test_data_dir_comes_from_argument_then_environment_then_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CNNSEARCH_DATA", raising=False)
    assert datasets.resolve_data_dir(None) == tmp_path / "data"
    monkeypatch.setenv("CNNSEARCH_DATA", str(tmp_path / "env"))
    assert datasets.resolve_data_dir(None) == tmp_path / "env"
    assert datasets.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


@pytest.mark.parametrize("name,looked_for", [("mnist", "MNIST/raw/train-images-idx3-ubyte"),
                                             ("fashion_mnist", "FashionMNIST/raw/train-images-idx3-ubyte"),
                                             ("cifar10", "cifar-10-batches-py/data_batch_1")])
def test_missing_dataset_says_where_it_looked_and_how_to_fix(tmp_path, name, looked_for):
    with pytest.raises(datasets.DatasetNotFound) as err:
        datasets.load_dataset(name, data_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path) in message and looked_for in message
    assert "--data-dir" in message and "--set download=true" in message and "--download" not in message
    assert list(tmp_path.iterdir()) == []  # no download attempted, nothing created


def test_the_data_dir_is_the_flag_then_the_environment_then_the_file_then_none(monkeypatch):
    monkeypatch.delenv("CNNSEARCH_DATA", raising=False)
    assert datasets.choose_data_dir(None, None) is None  # resolve_data_dir: ./data
    assert datasets.choose_data_dir(None, "/file") == "/file"
    assert datasets.choose_data_dir("/flag", "/file") == "/flag"
    monkeypatch.setenv("CNNSEARCH_DATA", "/env")
    assert datasets.choose_data_dir(None, None) == "/env"
    assert datasets.choose_data_dir(None, "/file") == "/env"  # the machine's environment beats the file
    assert datasets.choose_data_dir("/flag", "/file") == "/flag"


# The commands a data-loading error reaches the user through (launch: in its workers' logs; it
# takes --data-dir for them), and those that warn at create time about data not on this machine.
LOADING_COMMANDS = ("train", "predict", "run", "worker", "launch")
CREATING_COMMANDS = ("create", "run")
CLI_COMMANDS = {"train", "predict", "create", "run", "worker", "launch"}


def options_named(message: str, commands: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """Each `--option` in a message with the commands it must exist on: the ones written just
    before it ("train --set", "create/run --set"), else every command the message can reach."""
    found = []
    for match in re.finditer(r"(?:(\S+) )?(--[a-z][a-z-]*)", message):
        before = set((match.group(1) or "").split("/"))
        found.append((match.group(2), tuple(sorted(before)) if before <= CLI_COMMANDS else commands))
    return found


def missing_data_messages(tmp_path, monkeypatch) -> list[tuple[str, tuple[str, ...]]]:
    """Every message a user can get for data that is not there, with the commands it reaches."""
    from search.check import data_here

    messages = []
    for name in ("mnist", "fashion_mnist", "cifar10"):
        with pytest.raises(datasets.DatasetNotFound) as err:
            datasets.load_dataset(name, data_dir=tmp_path / "empty")
        messages.append((str(err.value), LOADING_COMMANDS))
        (warning,) = data_here({"dataset": name, "data_dir": str(tmp_path / "empty")})[1]
        messages.append((warning, CREATING_COMMANDS))

    class Broken:  # torchvision failing to download mnist, or to read cifar10's files
        def __init__(self, root, train, download):
            raise RuntimeError("Error downloading: all mirrors failed")

    fake_torchvision(monkeypatch, MNIST=Broken, CIFAR10=Broken)
    with pytest.raises(datasets.DataError) as err:
        datasets.load_dataset("mnist", data_dir=tmp_path / "offline", download=True)
    messages.append((str(err.value), LOADING_COMMANDS))
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (batches / name).write_bytes(b"")
    with pytest.raises(datasets.DataError) as err:
        datasets.load_dataset("cifar10", data_dir=tmp_path / "cifar")
    messages.append((str(err.value), LOADING_COMMANDS))
    return messages


def test_every_option_a_missing_data_message_names_exists_on_the_commands_it_reaches(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from search import config
    from search.cli import app

    helps = {}

    def has_option(command: str, option: str) -> bool:
        if command not in helps:
            result = CliRunner().invoke(app, [command, "--help"])
            assert result.exit_code == 0, result.output
            helps[command] = result.output
        return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helps[command]) is not None

    named = set()
    for message, commands in missing_data_messages(tmp_path, monkeypatch):
        assert "\n" not in message and "--download" not in message, message
        options = options_named(message, commands)
        assert any(option == "--data-dir" for option, _ in options), message
        for option, where in options:
            for command in where:
                assert has_option(command, option), f"{message!r} names {option}: `cnnsearch {command}` has none"
            named.add((option, where))
    assert ("--set", ("train",)) in named and ("--set", ("create", "run")) in named
    # ... and what the hints set is a real setting: in a RunConfig, and in a study's [data]
    assert config.load(None, ["download=true"]).download is True
    assert "download" in config.DATA_FIELDS


def test_fashion_mnist_reads_unpacked_idx_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    labels = {"train": torch.arange(40) % 10, "t10k": torch.arange(20) % 10}
    for split, y in labels.items():
        write_idx(raw / f"{split}-images-idx3-ubyte", torch.randint(0, 256, (len(y), 28, 28), generator=gen))
        write_idx(raw / f"{split}-labels-idx1-ubyte", y)
    ds = datasets.load_dataset("fashion_mnist", data_dir=tmp_path, val_fraction=0.25)
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (30, 10, 20)
    assert ds.classes[0] == "T-shirt/top" and ds.mean == (0.2860,)
    assert torch.equal(ds.test_y, labels["t10k"])


def fake_torchvision(monkeypatch, **classes):
    """Stands in for torchvision (its download needs the network; its import is slow)."""
    module = types.SimpleNamespace(datasets=types.SimpleNamespace(**classes))
    monkeypatch.setitem(sys.modules, "torchvision", module)


def test_download_fetches_mnist_with_torchvision_then_reads_it(tmp_path, monkeypatch):
    calls = []

    class FakeMNIST:  # writes what torchvision's download leaves behind: the unpacked files
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            raw = Path(root) / "MNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for split, n in (("train", 30), ("t10k", 10)):
                write_idx(raw / f"{split}-images-idx3-ubyte", torch.full((n, 28, 28), 7))
                write_idx(raw / f"{split}-labels-idx1-ubyte", torch.arange(n) % 10)

    fake_torchvision(monkeypatch, MNIST=FakeMNIST)
    ds = datasets.load_dataset("mnist", data_dir=tmp_path, download=True)
    assert calls[0] == (str(tmp_path), True, True)
    assert (len(ds.train_y) + len(ds.val_y), len(ds.test_y)) == (30, 10)


def test_failed_download_is_a_one_line_error(tmp_path, monkeypatch):
    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried mirrors, all failed")

    fake_torchvision(monkeypatch, MNIST=Offline)
    with pytest.raises(datasets.DataError, match="mnist: torchvision could not download") as err:
        datasets.load_dataset("mnist", data_dir=tmp_path, download=True)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_cifar10_is_converted_from_nhwc_to_nchw(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"")

    class FakeCIFAR10:
        classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

        def __init__(self, root, train, download):
            assert not download
            n = 50 if train else 20
            self.data = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]

    fake_torchvision(monkeypatch, CIFAR10=FakeCIFAR10)
    ds = datasets.load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.2)
    assert ds.in_shape == (3, 32, 32) and ds.classes[-1] == "truck" and len(ds.mean) == 3
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (40, 10, 20)
    expected = torch.from_numpy(FakeCIFAR10(None, False, False).data)
    assert torch.equal(ds.test_x[3, 1], expected[3, :, :, 1])  # channel 1 of image 3


def test_corrupted_idx_file_is_a_one_line_error(mnist_links):
    target = mnist_links / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    target.unlink()
    target.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 10000, 28, 28) + b"\x00" * 100))
    with pytest.raises(datasets.DataError, match="t10k-images-idx3-ubyte.gz is not a uint8 IDX file"):
        datasets.load_dataset("mnist", data_dir=mnist_links)


def test_to_device_moves_once_and_reuses_the_copy():
    ds = datasets.load_dataset("digits")
    assert datasets.to_device(ds, "cpu") is ds
    moved = datasets.to_device(ds, "meta")  # a real move without a GPU
    assert moved is not ds and moved.train_x.device.type == "meta" and moved.test_y.device.type == "meta"
    assert (moved.mean, moved.std, moved.classes, moved.in_shape) == (ds.mean, ds.std, ds.classes, ds.in_shape)
    assert datasets.to_device(ds, torch.device("meta")) is moved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_cuda_aliases_share_one_copy():
    ds = datasets.load_dataset("digits")
    moved = datasets.to_device(ds, "cuda")
    assert moved.train_x.is_cuda and datasets.to_device(ds, "cuda:0") is moved


def test_dataset_for_reads_the_run_config():
    cfg = RunConfig(dataset="synthetic", data_options={"n": 200, "classes": 4}, val_fraction=0.2, subset=100)
    ds = datasets.dataset_for(cfg)
    assert ds is datasets.load_dataset("synthetic", options={"classes": 4, "n": 200}, val_fraction=0.2, subset=100)
    assert (len(ds.train_y), len(ds.val_y), ds.num_classes) == (100, 40, 4)


FakeFolderData = namedtuple("FakeFolderData", "train_x train_y test_x test_y classes skipped")


@pytest.fixture
def fake_folder(monkeypatch):
    """Stands in for load_folder, so dispatch is tested apart from decoding (test_folder.py's part)."""
    calls = []

    def load_folder(path, *, image_size=32, channels=3, test_fraction=0.1, split_seed=0, strict=False,
                    cache_dir=None, workers=None):
        calls.append((path, image_size))
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (60, channels, image_size, image_size), generator=gen, dtype=torch.uint8)
        y = torch.arange(60) % 3
        return FakeFolderData(x[:50], y[:50], x[50:], y[50:], ["cat", "dog", "owl"], [])

    monkeypatch.setattr(folder_module, "load_folder", load_folder)
    return calls


def test_folder_dispatches_options_and_carves_val(fake_folder):
    ds = datasets.load_dataset("folder", options={"path": "pics", "image_size": 16})
    assert fake_folder == [("pics", 16)]
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (45, 5, 10)
    assert ds.classes == ("cat", "dog", "owl") and ds.in_shape == (3, 16, 16)
    assert ds.mean == _common._channel_stats(ds.train_x)[0] and len(ds.std) == 3


@pytest.mark.parametrize("options,key", [({"image_size": 16}, "options.path"),
                                         ({"path": "pics", "size": 16}, "'size'")])
def test_bad_folder_options_name_the_option(fake_folder, options, key):
    with pytest.raises(datasets.DataError, match=key):
        datasets.load_dataset("folder", options=options)


def test_relative_folder_paths_resolve_under_the_data_dir(tmp_path, monkeypatch):
    from search.datasets import resolve_folder_path

    monkeypatch.delenv("CNNSEARCH_DATA", raising=False)
    assert resolve_folder_path("pets", None) == Path("pets")
    assert resolve_folder_path("pets", tmp_path) == tmp_path / "pets"
    assert resolve_folder_path(tmp_path / "abs", "/elsewhere") == tmp_path / "abs"
    monkeypatch.setenv("CNNSEARCH_DATA", str(tmp_path))
    assert resolve_folder_path("pets", None) == tmp_path / "pets"


def test_shipped_jpeg_study_finds_the_zip_under_the_data_dir(shared_datasets):
    from search.datasets import resolve_folder_path
    from search.spec import load_spec

    spec = load_spec("studies/cifar10_jpeg_sixconv.toml", [f"data.data_dir={json.dumps(str(shared_datasets))}"])
    assert resolve_folder_path(spec.data["data_options"]["path"], spec.data["data_dir"]).is_file()


# The registry: what a dataset says about itself before loading must match what loading gives.

def image_folder(root: Path, classes=("ant", "bee", "cow", "dog"), per_class: int = 3) -> Path:
    from PIL import Image

    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (12 + j, 10), (60 * i, 20 * j, 100)).save(root / name / f"{j}.png")
    return root


@pytest.mark.parametrize("name,options", [("digits", None),
                                          ("synthetic", None),
                                          ("synthetic", {"n": 60, "classes": 3, "channels": 3, "size": 6})])
def test_describe_matches_the_loaded_dataset(name, options):
    ds = datasets.load_dataset(name, options=options)
    assert datasets.describe(name, options) == (ds.in_shape, ds.num_classes)


@pytest.mark.parametrize("options", [{}, {"channels": 1, "image_size": 7, "test_fraction": 0.4}])
def test_describe_matches_a_loaded_image_folder(tmp_path, options):
    image_folder(tmp_path / "pics")
    options = {"path": "pics", "cache_dir": str(tmp_path / "cache"), "workers": 1, **options}
    ds = datasets.load_dataset("folder", data_dir=tmp_path, options=options)
    assert datasets.describe("folder", options, data_dir=tmp_path) == (ds.in_shape, ds.num_classes)
    assert ds.num_classes == 4


def test_describe_matches_real_mnist(mnist_dir):
    ds = datasets.load_dataset("mnist", data_dir=mnist_dir)
    assert datasets.describe("mnist", data_dir=mnist_dir) == (ds.in_shape, ds.num_classes) == ((1, 28, 28), 10)


@pytest.mark.parametrize("name,shape", [("mnist", (1, 28, 28)), ("fashion_mnist", (1, 28, 28)),
                                        ("cifar10", (3, 32, 32))])
def test_describe_reads_no_files(tmp_path, name, shape):
    assert datasets.describe(name, data_dir=tmp_path / "empty") == (shape, 10)  # the folder does not exist


def test_describe_lists_a_folder_without_decoding_it(tmp_path, monkeypatch):
    image_folder(tmp_path / "pics", classes=("a", "b"))
    monkeypatch.setattr(folder_module, "_decode_chunk", lambda *args: pytest.fail("decoded an image"))
    assert datasets.describe("folder", {"path": str(tmp_path / "pics"), "image_size": 5}) == ((3, 5, 5), 2)
    with pytest.raises(datasets.FolderError, match="does not exist"):
        datasets.describe("folder", {"path": str(tmp_path / "nowhere")})


@pytest.mark.parametrize("name,options,match", [
    ("synthetic", {"colour": 1}, r"unknown key 'colour' for synthetic \(valid: n, classes, channels, size, seed\)"),
    ("folder", {"path": "p", "size": 8}, r"unknown key 'size' for folder \(valid: path, image_size, channels"),
    ("digits", {"size": 8}, "digits takes no options, got 'size'"),
    ("folder", {"image_size": 8}, "options.path"),
    ("synthetic", {"classes": 1}, "options.classes"),
    ("folder", {"path": "p", "channels": 2}, "channels must be 1"),
])
def test_describe_checks_options(name, options, match):
    with pytest.raises(datasets.DataError, match=match):
        datasets.describe(name, options)


def test_unknown_dataset_is_a_data_error_listing_the_valid_names():
    valid = "digits, synthetic, mnist, fashion_mnist, cifar10, folder"
    for call in (lambda: datasets.describe("imagenet"), lambda: datasets.get_dataset_info("imagenet")):
        with pytest.raises(datasets.DataError, match=f"unknown dataset 'imagenet' \\(valid: {valid}\\)"):
            call()


def test_registry_lists_the_built_in_datasets():
    assert datasets.DATASETS == datasets.names() == ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10",
                                                     "folder")
    info = datasets.get_dataset_info("mnist")
    assert info.uses_data_dir and not info.options and info.stats == ((0.1307,), (0.3081,))
    assert datasets.get_dataset_info("folder").options["path"] is datasets.REQUIRED


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test vanish after it."""
    from search.datasets import _registry

    monkeypatch.setattr(_registry, "_DATASETS", dict(_registry._DATASETS))


def test_registering_a_taken_name_fails(scratch_registry):
    with pytest.raises(ValueError, match="'digits' is already registered"):
        datasets.register_dataset("digits", shape=lambda o: (1, 1, 1), classes=lambda o, root: 2)(lambda *a: None)
    assert datasets.describe("digits") == ((1, 8, 8), 10)  # the first registration stands


def test_a_registered_dataset_loads_by_name(scratch_registry):
    @datasets.register_dataset("stripes", options={"width": 4}, shape=lambda o: (1, 2, o["width"]),
                               classes=lambda o, root: 2)
    def load(root, download, options):
        x = torch.arange(2 * options["width"], dtype=torch.uint8).repeat(20, 1, 1, 1).view(20, 1, 2, -1)
        y = torch.arange(20) % 2
        return x[:16], y[:16], x[16:], y[16:], ("even", "odd")

    ds = datasets.load_dataset("stripes", options={"width": 3}, val_fraction=0.25)
    assert datasets.describe("stripes", {"width": 3}) == (ds.in_shape, ds.num_classes) == ((1, 2, 3), 2)
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (12, 4, 4) and "stripes" in datasets.names()


@pytest.mark.parametrize("path", [[], ["a.zip"], 3, True, {"p": 1}, "", "  "])
def test_a_folder_path_that_is_not_a_path_is_one_line_naming_it(path, tmp_path):
    """A study file's `path = []` once reached pathlib and ended in a TypeError traceback."""
    for check in (lambda: datasets.describe("folder", {"path": path}, data_dir=tmp_path),
                  lambda: datasets.load_dataset("folder", options={"path": path}, data_dir=tmp_path)):
        with pytest.raises(datasets.DataError, match=r"options\.path: expected a path \(a non-empty string\)"):
            check()
