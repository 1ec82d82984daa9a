"""isample.experiments.data: CIFAR pickles and idx files written here, real Fashion-MNIST,
missing-data messages, long-tailed and stratified subsets."""

from __future__ import annotations

import dataclasses
import gzip
import math
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from isample.experiments import data

FMNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
CIFAR_URL = "https://www.cs.toronto.edu/~kriz"
HAS_SYSTEM_FMNIST = all((data.FASHION_MNIST_SYSTEM_DIR / f).is_file() for f in FMNIST_FILES)
SKIP_REASON = (
    f"real Fashion-MNIST not in {data.FASHION_MNIST_SYSTEM_DIR} "
    "(sudo apt-get install dataset-fashion-mnist)"
)
needs_fmnist = pytest.mark.skipif(not HAS_SYSTEM_FMNIST, reason=SKIP_REASON)


# -- writers of the standard formats (independent of the code under test) -------------------


def write_cifar10(folder: Path, per_batch: tuple[int, ...], n_test: int, seed: int = 0) -> dict:
    """The CIFAR-10 python layout with tiny batches: data_batch_1..5, test_batch, batches.meta.

    Returns the rows and labels written, as the real files hold them: uint8 rows of 3072 bytes
    (1024 red, 1024 green, 1024 blue, each 32×32 row-major) and lists of ints.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"train_rows": [], "train_labels": []}
    for i, n in enumerate(per_batch, start=1):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {b"batch_label": b"x", b"labels": labels, b"data": rows, b"filenames": []}
        _dump(folder / f"data_batch_{i}", batch)
        written["train_rows"].append(rows)
        written["train_labels"] += labels
    rows = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n_test)]
    _dump(folder / "test_batch", {b"batch_label": b"t", b"labels": labels, b"data": rows})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}
    _dump(folder / "batches.meta", meta)
    written["train_rows"] = np.concatenate(written["train_rows"])
    written.update(test_rows=rows, test_labels=labels, names=[n.decode() for n in names])
    return written


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_idx(
    path: Path, array: np.ndarray, *, magic: bytes | None = None, compress: bool = True
) -> None:
    """An idx file: 0x00 0x00 0x08 ndim, big-endian uint32 dims, then the bytes."""
    array = np.asarray(array, dtype=np.uint8)
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_mnist(folder: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    """The four gzipped idx files of an MNIST-like set of 28×28 images; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, a in arrays.items():
        write_idx(folder / f"{stem}.gz", a)
    return arrays


def numpy_mean_std(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def synthetic(per_class: list[int], seed: int = 0, num_test: int = 30) -> data.Dataset:
    """A Dataset whose image i carries its index i in its first two bytes (to trace subsets)."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])
    rng.shuffle(labels)
    n = labels.size
    images = rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) // 256
    images[:, 0, 0, 1] = np.arange(n) % 256
    test_labels = np.arange(num_test) % len(per_class)
    test_images = rng.integers(0, 256, (num_test, 3, 4, 4), dtype=np.uint8)
    train_images = torch.from_numpy(images)
    mean, std = data.channel_mean_std(train_images)
    return data.Dataset(
        name="synthetic",
        train_images=train_images,
        train_labels=torch.from_numpy(labels.astype(np.int64)),
        test_images=torch.from_numpy(test_images),
        test_labels=torch.from_numpy(test_labels.astype(np.int64)),
        num_classes=len(per_class),
        classes=tuple(f"c{c}" for c in range(len(per_class))),
        mean=mean,
        std=std,
        class_counts=tuple(per_class),
    )


def original_indices(ds: data.Dataset) -> np.ndarray:
    x = ds.train_images.numpy().astype(np.int64)
    return x[:, 0, 0, 0] * 256 + x[:, 0, 0, 1]


# -- CIFAR ----------------------------------------------------------------------------------


def test_cifar10_reads_the_standard_pickles(tmp_path):
    written = write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=(3, 1, 4, 2, 2), n_test=5)
    ds = data.load_dataset("cifar10", tmp_path)
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.classes == tuple(written["names"])
    assert ds.train_images.shape == (12, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (5, 3, 32, 32) and ds.test_images.dtype == torch.uint8
    assert ds.train_labels.dtype == torch.int64 and ds.test_labels.dtype == torch.int64
    # batches concatenated in order 1..5
    assert ds.train_labels.tolist() == written["train_labels"]
    assert ds.test_labels.tolist() == written["test_labels"]
    rows = written["train_rows"]
    for i in (0, 3, 11):
        for c in range(3):  # the first 1024 bytes are red, then green, then blue
            plane = rows[i, 1024 * c : 1024 * (c + 1)].reshape(32, 32)
            np.testing.assert_array_equal(ds.train_images[i, c].numpy(), plane)
    # one byte, traced by hand: green plane (offset 1024), row y = 5, column x = 7
    assert ds.train_images[3, 1, 5, 7].item() == rows[3, 1024 + 5 * 32 + 7]
    assert ds.test_images[4, 2, 31, 0].item() == written["test_rows"][4, 2048 + 31 * 32]
    mean, std = numpy_mean_std(rows.reshape(-1, 3, 32, 32))
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(ds.std, std, rtol=1e-12)
    assert ds.class_counts == tuple(np.bincount(written["train_labels"], minlength=10))
    assert sum(ds.class_counts) == ds.num_train == 12


def test_cifar10_found_when_data_dir_is_the_folder_itself(tmp_path):
    write_cifar10(tmp_path, per_batch=(1, 1, 1, 1, 1), n_test=1)
    assert data.load_dataset("CIFAR-10", tmp_path).num_train == 5


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    train_rows = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
    test_rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    fine_train, fine_test = [99, 0, 42, 7, 7, 63, 1], [5, 99, 0]
    # coarse labels differ from the fine ones, so reading the wrong key is caught
    train = {b"data": train_rows, b"fine_labels": fine_train, b"coarse_labels": [19] * 7}
    _dump(folder / "train", train)
    _dump(folder / "test", {b"data": test_rows, b"fine_labels": fine_test, b"coarse_labels": [3] * 3})
    fine_names = [f"fine{i}".encode() for i in range(100)]
    _dump(folder / "meta", {b"fine_label_names": fine_names, b"coarse_label_names": [b"c"] * 20})
    ds = data.load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.classes[42] == "fine42"
    assert ds.train_labels.tolist() == fine_train and ds.test_labels.tolist() == fine_test
    assert ds.train_images.shape == (7, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(ds.train_images.numpy(), train_rows.reshape(7, 3, 32, 32))
    red = train_rows[2, :1024].reshape(32, 32)
    np.testing.assert_array_equal(ds.train_images[2, 0].numpy(), red)
    assert ds.class_counts[7] == 2 and ds.class_counts[3] == 0


def test_cifar_bad_batch_raises_valueerror_naming_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, per_batch=(2, 2, 2, 2, 2), n_test=2)
    _dump(folder / "data_batch_3", {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"data_batch_3.*\(n, 3072\)"):
        data.load_dataset("cifar10", tmp_path)
    _dump(folder / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(ValueError, match=r"data_batch_3: 2 images but 1 labels"):
        data.load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="data_batch_3"):
        data.load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        data.load_dataset("cifar10", tmp_path)


def test_label_out_of_range_is_rejected(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, per_batch=(2, 2, 2, 2, 2), n_test=2)
    _dump(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]})
    with pytest.raises(ValueError, match=r"test labels span \[3, 10\]"):
        data.load_dataset("cifar10", tmp_path)


# -- idx (MNIST, Fashion-MNIST) ---------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    a = np.random.default_rng(0).integers(0, 256, (4, 3, 5), dtype=np.uint8)
    write_idx(tmp_path / "x", a, compress=compress)
    got = data.read_idx(tmp_path / "x", ndim=3)
    assert got.dtype == np.uint8 and got.shape == (4, 3, 5) and got.flags.writeable
    np.testing.assert_array_equal(got, a)
    labels = np.array([9, 0, 3], np.uint8)
    write_idx(tmp_path / "y", labels, compress=compress)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "y", ndim=1), labels)


def test_read_idx_rejects_bad_files_naming_them(tmp_path):
    a = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    good = tmp_path / "good.gz"
    write_idx(good, a)
    raw = gzip.decompress(good.read_bytes())

    truncated = tmp_path / "truncated-idx3-ubyte.gz"
    truncated.write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ValueError, match=r"truncated-idx3-ubyte\.gz: truncated"):
        data.read_idx(truncated)

    trailing = tmp_path / "trailing.gz"
    trailing.write_bytes(gzip.compress(raw + b"\x00"))
    with pytest.raises(ValueError, match=r"trailing\.gz: has trailing bytes"):
        data.read_idx(trailing)

    wrong_magic = tmp_path / "magic.gz"
    write_idx(wrong_magic, a, magic=b"\x00\x00\x09\x03")  # type code 0x09 (signed byte)
    with pytest.raises(ValueError, match=r"magic\.gz: bad idx magic number 0x00000903"):
        data.read_idx(wrong_magic)

    labels_as_images = tmp_path / "labels.gz"
    write_idx(labels_as_images, np.zeros(5, np.uint8))  # magic 0x00000801
    with pytest.raises(ValueError, match=r"labels\.gz: idx magic 0x00000801 has 1 dim.*expected 3"):
        data.read_idx(labels_as_images, ndim=3)

    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes(good.read_bytes()[:-12])  # the stream ends before its trailer
    with pytest.raises(ValueError, match=r"cut\.gz: corrupt or truncated gzip"):
        data.read_idx(cut_gzip)

    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x02")  # header cut after one dimension
    with pytest.raises(ValueError, match="short: truncated idx header"):
        data.read_idx(short)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_dataset_from_data_dir(tmp_path, name):
    arrays = write_mnist(tmp_path, n_train=12, n_test=5)
    ds = data.load_dataset(name, tmp_path)  # data_dir comes before the system folder
    assert ds.name == name and ds.source == str(tmp_path)
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.test_images.shape == (5, 1, 28, 28)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    np.testing.assert_array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.num_classes == 10 and len(ds.classes) == 10
    assert ds.classes[9] == ("Ankle boot" if name == "fashion-mnist" else "9")
    mean, std = numpy_mean_std(arrays["train-images-idx3-ubyte"][:, None])
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(ds.std, std, rtol=1e-12)


def test_idx_dataset_with_mismatched_counts(tmp_path):
    write_mnist(tmp_path, n_train=12, n_test=5)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(ValueError, match="holds 12 images but .* holds 11 labels"):
        data.load_dataset("mnist", tmp_path)


def test_truncated_file_in_a_dataset_is_named(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: truncated"):
        data.load_dataset("mnist", tmp_path)


@pytest.fixture(scope="module")
def fmnist() -> data.Dataset:
    if not HAS_SYSTEM_FMNIST:
        pytest.skip(SKIP_REASON)
    return data.load_dataset("fashion-mnist", "/nonexistent-isample-data-dir")


@needs_fmnist
def test_real_fashion_mnist(fmnist):
    assert fmnist.source == str(data.FASHION_MNIST_SYSTEM_DIR)
    assert fmnist.train_images.shape == (60000, 1, 28, 28)
    assert fmnist.test_images.shape == (10000, 1, 28, 28)
    assert fmnist.train_images.dtype == torch.uint8 and fmnist.train_labels.dtype == torch.int64
    assert fmnist.num_classes == 10 and fmnist.classes[0] == "T-shirt/top"
    assert fmnist.class_counts == (6000,) * 10
    assert torch.bincount(fmnist.test_labels).tolist() == [1000] * 10
    assert (fmnist.in_channels, fmnist.image_size) == (1, 28)
    # the widely quoted Fashion-MNIST statistics, and an independent float64 computation
    assert fmnist.mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert fmnist.std[0] == pytest.approx(0.3530, abs=1e-4)
    x = fmnist.train_images.to(torch.float64) / 255
    assert fmnist.mean[0] == pytest.approx(x.mean().item(), rel=1e-12)
    assert fmnist.std[0] == pytest.approx(x.std(unbiased=False).item(), rel=1e-9)


# -- missing data and download --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10", ["cifar-10-batches-py", f"{CIFAR_URL}/cifar-10-python.tar.gz", "download=True"]),
        ("cifar100", ["cifar-100-python", f"{CIFAR_URL}/cifar-100-python.tar.gz", "download=True"]),
        ("mnist", ["train-images-idx3-ubyte.gz", "MNIST/raw", "download=True"]),
        ("fashion-mnist", ["apt-get install dataset-fashion-mnist", "FashionMNIST/raw", "download=True"]),
    ],
)
def test_missing_dataset_says_where_it_looked_and_how_to_get_it(
    tmp_path, monkeypatch, name, expected
):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset(name, empty)
    message = str(info.value)
    assert str(empty) in message
    for text in expected:
        assert text in message
    if name == "fashion-mnist":
        assert str(tmp_path / "no-system-copy") in message


def test_default_data_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ISAMPLE_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    write_mnist(tmp_path)
    assert data.load_dataset("mnist").source == str(tmp_path)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        data.load_dataset("svhn")


@pytest.mark.parametrize(
    "name, tv_class", [("cifar10", "CIFAR10"), ("fashion-mnist", "FashionMNIST")]
)
def test_download_reads_from_torchvision_layout(tmp_path, monkeypatch, name, tv_class):
    """download=True calls torchvision only when no local copy exists, then reads its layout."""
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")
    calls = []

    def fake_download(class_name: str, root: Path) -> None:
        # what torchvision leaves behind: root/cifar-10-batches-py/, root/FashionMNIST/raw/
        calls.append((class_name, root))
        if class_name == "CIFAR10":
            write_cifar10(root / "cifar-10-batches-py", per_batch=(1,) * 5, n_test=1)
        else:
            write_mnist(root / "FashionMNIST" / "raw")

    monkeypatch.setattr(data, "_torchvision_download", fake_download)
    with pytest.raises(FileNotFoundError):
        data.load_dataset(name, tmp_path)
    assert calls == []
    ds = data.load_dataset(name, tmp_path, download=True)
    assert calls == [(tv_class, tmp_path)] and ds.num_train > 0
    data.load_dataset(name, tmp_path, download=True)
    assert len(calls) == 1  # found locally the second time


def test_torchvision_layout_names_match():
    tvd = pytest.importorskip("torchvision.datasets")
    assert tvd.CIFAR10.base_folder == "cifar-10-batches-py"
    assert tvd.CIFAR100.base_folder == "cifar-100-python"
    fm = tvd.FashionMNIST.__new__(tvd.FashionMNIST)
    fm.root = "/r"
    assert fm.raw_folder == "/r/FashionMNIST/raw"
    assert {f for f, _ in tvd.FashionMNIST.resources} == set(FMNIST_FILES)


# -- the Dataset record ---------------------------------------------------------------------


def test_dataset_checks_its_fields():
    ds = synthetic([3, 3])
    with pytest.raises(ValueError, match="train_images must be a uint8"):
        dataclasses.replace(ds, train_images=ds.train_images.float())
    with pytest.raises(ValueError, match="test_labels must be int64"):
        dataclasses.replace(ds, test_labels=ds.test_labels.int())
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        dataclasses.replace(ds, mean=(0.5,))
    moved = ds.to("cpu")
    assert moved.train_images.device.type == "cpu"
    assert torch.equal(moved.train_images, ds.train_images)


def test_import_isample_does_not_load_experiments():
    code = "import sys, isample; sys.exit('isample.experiments' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- long-tailed and stratified subsets ----------------------------------------------------


@pytest.mark.parametrize("ratio", [1, 2.5, 10, 100, 200])
def test_long_tailed_counts_follow_the_exponential_profile(ratio):
    ds = synthetic([200] * 10, num_test=40)
    lt = data.long_tailed(ds, ratio, seed=3)
    expected = [math.floor(200 * ratio ** (-c / 9)) for c in range(10)]
    assert expected[0] == 200 and expected[9] == math.floor(200 / ratio)
    assert list(lt.class_counts) == expected
    assert torch.bincount(lt.train_labels, minlength=10).tolist() == expected
    # the examples kept are distinct originals, in original order, with their own labels
    idx = original_indices(lt)
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(lt.train_labels.numpy(), ds.train_labels.numpy()[idx])
    np.testing.assert_array_equal(lt.train_images.numpy(), ds.train_images.numpy()[idx])
    assert lt.test_images is ds.test_images and lt.test_labels is ds.test_labels
    mean, std = numpy_mean_std(lt.train_images.numpy())
    np.testing.assert_allclose(lt.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(lt.std, std, rtol=1e-12)


def test_long_tailed_ratio_one_is_the_identity():
    ds = synthetic([50] * 4)
    lt = data.long_tailed(ds, 1.0, seed=9)
    assert torch.equal(lt.train_images, ds.train_images)
    assert torch.equal(lt.train_labels, ds.train_labels)
    assert lt.class_counts == ds.class_counts and lt.mean == ds.mean


def test_long_tailed_is_deterministic_for_a_seed():
    ds = synthetic([100] * 5)
    a, b, c = (data.long_tailed(ds, 10, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.train_images, b.train_images)
    assert a.class_counts == c.class_counts and not torch.equal(a.train_images, c.train_images)


def test_long_tailed_on_an_unbalanced_set_uses_the_smallest_class():
    ds = synthetic([100, 80, 120])
    assert data.long_tailed(ds, 4).class_counts == (80, 40, 20)


def test_long_tailed_rejects_bad_ratios():
    ds = synthetic([10] * 3)
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="imbalance_ratio must be"):
            data.long_tailed(ds, bad)
    with pytest.raises(ValueError, match="leaves class 2 empty"):
        data.long_tailed(ds, 11)
    with pytest.raises(ValueError, match="at least 2 classes"):
        data.long_tailed(synthetic([10]), 2)


def test_subset_is_stratified_exact_and_seeded():
    ds = synthetic([60] * 5, num_test=50)
    sub = data.subset(ds, train_size=100, test_size=25, seed=4)
    assert sub.class_counts == (20,) * 5 and sub.num_train == 100
    assert torch.bincount(sub.test_labels, minlength=5).tolist() == [5] * 5
    idx = original_indices(sub)
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(sub.train_labels.numpy(), ds.train_labels.numpy()[idx])
    again = data.subset(ds, train_size=100, test_size=25, seed=4)
    other = data.subset(ds, train_size=100, test_size=25, seed=5)
    assert torch.equal(again.train_images, sub.train_images)
    assert torch.equal(again.test_images, sub.test_images)
    assert not torch.equal(other.train_images, sub.train_images)
    only_test = data.subset(ds, test_size=10)
    assert only_test.train_images is ds.train_images and only_test.num_test == 10


def test_subset_of_an_unbalanced_set_keeps_proportions():
    ds = synthetic([500, 300, 150, 50])
    sub = data.subset(ds, train_size=99)
    assert sum(sub.class_counts) == 99
    exact = [99 * n / 1000 for n in (500, 300, 150, 50)]
    for got, want in zip(sub.class_counts, exact):
        assert abs(got - want) < 1
    mean, std = numpy_mean_std(sub.train_images.numpy())
    np.testing.assert_allclose(sub.mean, mean, rtol=1e-12)


def test_subset_rejects_bad_sizes():
    ds = synthetic([5] * 2, num_test=4)
    with pytest.raises(ValueError, match=r"train_size must be in \[1, 10\]"):
        data.subset(ds, train_size=11)
    with pytest.raises(ValueError, match=r"test_size must be in \[1, 4\]"):
        data.subset(ds, test_size=0)


@needs_fmnist
def test_real_fashion_mnist_long_tailed_and_subset(fmnist):
    lt = data.long_tailed(fmnist, 100)
    assert list(lt.class_counts) == [math.floor(6000 * 100 ** (-c / 9)) for c in range(10)]
    assert lt.class_counts[-1] == 60 and lt.num_test == 10000
    sub = data.subset(fmnist, 2000, 1000)
    assert sub.class_counts == (200,) * 10
    assert torch.bincount(sub.test_labels).tolist() == [100] * 10
