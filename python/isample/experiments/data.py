"""Image classification data sets held in memory as uint8 tensors.

``load_dataset`` reads CIFAR-10, CIFAR-100, Fashion-MNIST and MNIST from their standard files
(parsed here, without torchvision) into a :class:`Dataset`; ``long_tailed`` and ``subset``
derive class-imbalanced and small stratified training sets from it. The data sets are small
(CIFAR-10 is 150 MB as uint8), so everything lives in tensors that a training loop moves to
its device once and gathers batches from by index.

Where the files are looked for, in order (``data_dir`` defaults to ``$ISAMPLE_DATA_DIR``, else
``~/.cache/isample/data``):

- CIFAR-10: ``data_dir/cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``,
  ``batches.meta``), or those files directly in ``data_dir``;
- CIFAR-100: ``data_dir/cifar-100-python/`` (``train``, ``test``, ``meta``), or ``data_dir``;
- Fashion-MNIST / MNIST: the four idx files (``train-images-idx3-ubyte.gz`` etc., gzipped or
  not) in ``data_dir``, ``data_dir/fashion-mnist`` (``mnist``), torchvision's
  ``data_dir/FashionMNIST/raw`` (``MNIST/raw``) and, for Fashion-MNIST, Debian's
  ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).

With ``download=True`` and no local copy, torchvision's dataset classes fetch the files into
``data_dir``; then they are read as above.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pickle
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

__all__ = [
    "Dataset",
    "DATASETS",
    "FASHION_MNIST_SYSTEM_DIR",
    "default_data_dir",
    "load_dataset",
    "long_tailed",
    "long_tailed_counts",
    "subset",
    "read_idx",
    "channel_mean_std",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Names accepted by :func:`load_dataset`.
DATASETS = ("cifar10", "cifar100", "fashion-mnist", "mnist")

#: Where Debian's ``dataset-fashion-mnist`` package installs the four idx files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_MNIST_CLASSES = tuple(str(d) for d in range(10))

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_CIFAR10_DIR, _CIFAR100_DIR = "cifar-10-batches-py", "cifar-100-python"
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's first mirror
_FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


@dataclasses.dataclass(frozen=True, eq=False)  # tensors have no bool ==: compare by identity
class Dataset:
    """A labelled image data set in memory (not a ``torch.utils.data.Dataset``: index it yourself).

    Attributes:
        name: ``"cifar10"``, ``"cifar100"``, ``"fashion-mnist"`` or ``"mnist"``, with suffixes
            such as ``"-lt100"`` or ``"-sub1000"`` for derived sets.
        train_images: uint8, N×C×H×W (CHW order, values 0..255).
        train_labels: int64, N, in ``[0, num_classes)``.
        test_images: uint8, M×C×H×W.
        test_labels: int64, M.
        num_classes: number of classes C.
        classes: the C class names, in label order.
        mean, std: per channel, of ``train_images / 255`` over all training pixels (population
            std), as floats; what :func:`isample.experiments.augment.normalize` takes.
        class_counts: training examples per class (length C).
        source: where the files were read from (for reports).
    """

    name: str
    train_images: torch.Tensor = dataclasses.field(repr=False)
    train_labels: torch.Tensor = dataclasses.field(repr=False)
    test_images: torch.Tensor = dataclasses.field(repr=False)
    test_labels: torch.Tensor = dataclasses.field(repr=False)
    num_classes: int
    classes: tuple[str, ...] = dataclasses.field(repr=False)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_counts: tuple[int, ...]
    source: str = ""

    def __post_init__(self) -> None:
        # A wrong dtype or shape here would surface much later as a silent broadcast or an
        # index error deep in the training loop; fail at construction instead.
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(
                    f"{split}_images must be a uint8 N×C×H×W tensor, got {images.dtype} "
                    f"of shape {tuple(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{split}_labels must be int64 of shape ({images.shape[0]},), got "
                    f"{labels.dtype} of shape {tuple(labels.shape)}"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"train and test images differ in shape: {tuple(self.train_images.shape[1:])} "
                f"vs {tuple(self.test_images.shape[1:])}"
            )
        if len(self.classes) != self.num_classes or len(self.class_counts) != self.num_classes:
            raise ValueError(
                f"num_classes={self.num_classes} but {len(self.classes)} class names and "
                f"{len(self.class_counts)} class counts"
            )
        channels = self.train_images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values (one per channel)")

    @property
    def in_channels(self) -> int:
        """C, the number of image channels (1 for the MNISTs, 3 for CIFAR)."""
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        """H (= W for all the supported data sets): 28 for the MNISTs, 32 for CIFAR."""
        return int(self.train_images.shape[2])

    @property
    def num_train(self) -> int:
        """N, the number of training examples."""
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        """M, the number of test examples."""
        return int(self.test_images.shape[0])

    def to(self, device: torch.device | str) -> Dataset:
        """A copy of the record with its four tensors on ``device`` (tensors already there are
        shared, not copied)."""
        device = torch.device(device)
        tensors = {
            f: getattr(self, f).to(device)
            for f in ("train_images", "train_labels", "test_images", "test_labels")
        }
        return dataclasses.replace(self, **tensors)


def default_data_dir() -> Path:
    """``$ISAMPLE_DATA_DIR`` if set, else ``~/.cache/isample/data``."""
    env = os.environ.get("ISAMPLE_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "isample" / "data"


def load_dataset(name: str, data_dir: PathLike | None = None, *, download: bool = False) -> Dataset:
    """Load one of :data:`DATASETS` into memory as uint8 tensors (see the module docstring).

    Args:
        name: ``"cifar10"``, ``"cifar100"``, ``"fashion-mnist"`` or ``"mnist"`` (case and
            ``_``/``-`` are ignored: ``"fashion_mnist"`` works too).
        data_dir: the folder to look in (and download into); default :func:`default_data_dir`.
        download: fetch the files with torchvision when no local copy is found (needs a network
            and torchvision).

    Raises:
        ValueError: an unknown name, or a file that is truncated or not in the expected format.
        FileNotFoundError: no local copy and ``download=False``; the message lists the folders
            searched and how to get the data.
    """
    key = name.lower().replace("_", "-")
    aliases = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}
    key = aliases.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, root, download)
    return _load_idx_dataset(key, root, download)


# --------------------------------------------------------------------------- CIFAR


def _unpickle(path: Path) -> dict[bytes, Any]:
    # The CIFAR files are Python 2 pickles: encoding="bytes" keeps their str keys as bytes and
    # lets numpy arrays load. Pickle runs code from the file, so only read trusted copies.
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 n×3×32×32, labels int64 n) from one CIFAR batch file."""
    batch = _unpickle(path)
    if b"data" not in batch or label_key not in batch:
        found = ", ".join(repr(k) for k in batch)
        raise ValueError(f"{path}: expected keys b'data' and {label_key!r}, found {found}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' must be uint8 of shape (n, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.size} labels")
    # Each 3072-byte row is the red, then green, then blue plane, each 32×32 row-major: a
    # plain reshape gives CHW.
    return data.reshape(-1, 3, 32, 32), labels


def _find_cifar_dir(root: Path, folder: str, probe: str) -> tuple[Path | None, list[Path]]:
    candidates = [root / folder, root]
    for c in candidates:
        if (c / probe).is_file():
            return c, candidates
    return None, candidates


def _load_cifar(key: str, root: Path, download: bool) -> Dataset:
    if key == "cifar10":
        folder, url, probe = _CIFAR10_DIR, _CIFAR10_URL, "data_batch_1"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file = ["test_batch"], "batches.meta"
        label_key, names_key, tv_class = b"labels", b"label_names", "CIFAR10"
    else:
        folder, url, probe = _CIFAR100_DIR, _CIFAR100_URL, "train"
        train_files, test_files, meta_file = ["train"], ["test"], "meta"
        label_key, names_key, tv_class = b"fine_labels", b"fine_label_names", "CIFAR100"

    found, searched = _find_cifar_dir(root, folder, probe)
    if found is None and download:
        _torchvision_download(tv_class, root)
        found, searched = _find_cifar_dir(root, folder, probe)
    if found is None:
        where = "\n".join(f"  {p}" for p in searched)
        raise FileNotFoundError(
            f"{key}: no '{probe}' file found; looked in\n{where}\n"
            f"Get it by downloading {url} and extracting it in {root} (so that "
            f"{root / folder / probe} exists), or pass download=True (--download) to fetch it "
            f"with torchvision, or point data_dir (--data-dir) at a folder that holds {folder}/."
        )

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        missing = [f for f in files if not (found / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{key}: {found} is incomplete: missing {', '.join(missing)}")
        parts = [_read_cifar_batch(found / f, label_key) for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    meta_path = found / meta_file
    if not meta_path.is_file():
        raise FileNotFoundError(f"{key}: {found} is incomplete: missing {meta_file} (class names)")
    meta = _unpickle(meta_path)
    if names_key not in meta:
        raise ValueError(f"{meta_path}: no {names_key!r} entry")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
    return _make_dataset(key, train_x, train_y, test_x, test_y, classes, str(found))


# --------------------------------------------------------------------------- idx (MNISTs)

# The idx header: two zero bytes, a type code, the number of dimensions, then one big-endian
# uint32 per dimension. Only unsigned bytes (0x08) occur in the MNISTs.
_IDX_UBYTE = 0x08


def read_idx(path: PathLike, *, ndim: int | None = None) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzipped or not) into a writable uint8 array of its shape.

    Args:
        path: the file; gzip is detected from its first two bytes, not its name.
        ndim: the number of dimensions the file must have (3 for images, 1 for labels), or None.

    Raises:
        ValueError: naming the file, for a wrong magic number, a type other than unsigned byte,
            an unexpected ``ndim``, a bad gzip stream, or a size that does not match the header
            (a truncated file or trailing bytes).
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an idx header")
    magic = int.from_bytes(raw[:4], "big")
    zero, dtype_code, dims = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != _IDX_UBYTE or dims == 0:
        raise ValueError(
            f"{path}: bad idx magic number 0x{magic:08x}; expected 0x0000080N (unsigned bytes, "
            f"N dimensions), e.g. 0x00000803 for images and 0x00000801 for labels"
        )
    if ndim is not None and dims != ndim:
        raise ValueError(
            f"{path}: idx magic 0x{magic:08x} has {dims} dimensions, expected {ndim} "
            f"(0x{0x800 + ndim:08x})"
        )
    header = 4 + 4 * dims
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} of {header} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = math.prod(shape)
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {what}: header says shape {shape} ({expected} bytes of data), "
            f"found {len(raw) - header}"
        )
    # A copy: frombuffer over bytes is read-only, and torch warns on non-writable arrays.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _idx_candidates(key: str, root: Path) -> list[Path]:
    tv_folder = "FashionMNIST" if key == "fashion-mnist" else "MNIST"
    dirs = [root, root / key, root / tv_folder / "raw"]
    if key == "fashion-mnist":
        dirs.append(FASHION_MNIST_SYSTEM_DIR)
    return dirs


def _find_idx_files(key: str, root: Path) -> tuple[dict[str, Path] | None, list[Path]]:
    dirs = _idx_candidates(key, root)
    for d in dirs:
        files: dict[str, Path] = {}
        for part, stem in _IDX_FILES.items():
            for name in (stem + ".gz", stem):
                if (d / name).is_file():
                    files[part] = d / name
                    break
        if len(files) == len(_IDX_FILES):
            return files, dirs
    return None, dirs


def _load_idx_dataset(key: str, root: Path, download: bool) -> Dataset:
    files, searched = _find_idx_files(key, root)
    if files is None and download:
        _torchvision_download("FashionMNIST" if key == "fashion-mnist" else "MNIST", root)
        files, searched = _find_idx_files(key, root)
    if files is None:
        where = "\n".join(f"  {p}" for p in searched)
        names = ", ".join(s + ".gz" for s in _IDX_FILES.values())
        if key == "fashion-mnist":
            how = (
                f"Install Debian's package: `sudo apt-get install dataset-fashion-mnist` (it puts "
                f"them in {FASHION_MNIST_SYSTEM_DIR}), or download them from {_FASHION_MNIST_URL} "
                f"into {root}, or pass download=True (--download) to fetch them with torchvision."
            )
        else:
            how = (
                f"Download them from {_MNIST_URL} into {root}, or pass download=True "
                f"(--download) to fetch them with torchvision."
            )
        raise FileNotFoundError(
            f"{key}: the four idx files ({names}) were not all found; looked in\n{where}\n{how}"
        )
    arrays = {}
    for part, path in files.items():
        arrays[part] = read_idx(path, ndim=3 if part.endswith("images") else 1)
    for split in ("train", "test"):
        n_img, n_lab = arrays[f"{split}_images"].shape[0], arrays[f"{split}_labels"].shape[0]
        if n_img != n_lab:
            raise ValueError(
                f"{key}: {files[f'{split}_images']} holds {n_img} images but "
                f"{files[f'{split}_labels']} holds {n_lab} labels"
            )
    classes = _FASHION_MNIST_CLASSES if key == "fashion-mnist" else _MNIST_CLASSES
    return _make_dataset(
        key,
        arrays["train_images"][:, None],  # N×H×W -> N×1×H×W
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None],
        arrays["test_labels"].astype(np.int64),
        classes,
        str(files["train_images"].parent),
    )


def _torchvision_download(class_name: str, root: Path) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise ImportError(
            f"download=True needs torchvision (pip install torchvision) to fetch {class_name}"
        ) from e
    root.mkdir(parents=True, exist_ok=True)
    # Constructing the train split downloads the whole archive (train and test) into root:
    # cifar-10-batches-py/, cifar-100-python/, FashionMNIST/raw/ or MNIST/raw/.
    getattr(tvd, class_name)(root=str(root), train=True, download=True)


# --------------------------------------------------------------------------- building sets


def channel_mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 N×C×H×W ``images``, scaled to [0, 1].

    Computed from a 256-bin histogram per channel in float64, so it is exact (up to the
    final rounding) and needs no float copy of the images.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"expected uint8 N×C×H×W images, got {images.dtype} of shape {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("cannot compute the mean and std of an empty image set")
    values = torch.arange(256, dtype=torch.float64, device=images.device) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = hist.sum()
        mean = (hist * values).sum() / n
        var = (hist * (values - mean) ** 2).sum() / n
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def _class_counts(labels: torch.Tensor, num_classes: int) -> tuple[int, ...]:
    return tuple(int(c) for c in torch.bincount(labels.cpu(), minlength=num_classes)[:num_classes])


def _make_dataset(
    name: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    classes: Sequence[str],
    source: str,
) -> Dataset:
    num_classes = len(classes)
    for split, y in (("train", train_y), ("test", test_y)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"{name} ({source}): {split} labels span [{y.min()}, {y.max()}], outside "
                f"[0, {num_classes}) for {num_classes} classes"
            )
    train_images = torch.from_numpy(np.ascontiguousarray(train_x))
    train_labels = torch.from_numpy(np.ascontiguousarray(train_y, dtype=np.int64))
    mean, std = channel_mean_std(train_images)
    return Dataset(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        test_images=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_labels=torch.from_numpy(np.ascontiguousarray(test_y, dtype=np.int64)),
        num_classes=num_classes,
        classes=tuple(classes),
        mean=mean,
        std=std,
        class_counts=_class_counts(train_labels, num_classes),
        source=source,
    )


def _with_train(dataset: Dataset, keep: torch.Tensor, name: str) -> Dataset:
    """``dataset`` with its training set reduced to the (sorted) indices ``keep``."""
    keep = keep.to(dataset.train_images.device)
    images, labels = dataset.train_images[keep], dataset.train_labels[keep]
    mean, std = channel_mean_std(images)
    return dataclasses.replace(
        dataset,
        name=name,
        train_images=images,
        train_labels=labels,
        mean=mean,
        std=std,
        class_counts=_class_counts(labels, dataset.num_classes),
    )


def _class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    labels = labels.cpu()
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


def long_tailed_counts(class_counts: Sequence[int], imbalance_ratio: float) -> list[int]:
    """Per-class counts n_c = floor(n_max · ratio^(−c/(C−1))), n_max the smallest class count.

    The exponential profile of Cui et al. (2019) and Cao et al. (2019), whose code also takes
    the floor. n_max is the smallest available count so that every class can supply its n_c
    (on a balanced set it is simply the per-class count, 5000 for CIFAR-10).
    """
    num_classes = len(class_counts)
    if num_classes < 2:
        raise ValueError(f"a long-tailed profile needs at least 2 classes, got {num_classes}")
    if not (math.isfinite(imbalance_ratio) and imbalance_ratio >= 1):
        raise ValueError(f"imbalance_ratio must be a finite number >= 1, got {imbalance_ratio}")
    n_max = min(class_counts)
    counts = [
        int(math.floor(n_max * imbalance_ratio ** (-c / (num_classes - 1))))
        for c in range(num_classes)
    ]
    if min(counts) == 0:
        raise ValueError(
            f"imbalance_ratio={imbalance_ratio} leaves class {counts.index(0)} empty "
            f"(n_max={n_max}); use a ratio of at most {n_max}"
        )
    return counts


def long_tailed(dataset: Dataset, imbalance_ratio: float, *, seed: int = 0) -> Dataset:
    """A class-imbalanced training set with an exponential profile; the test set is untouched.

    Class c keeps n_c = floor(n_max · ratio^(−c/(C−1))) examples (:func:`long_tailed_counts`),
    so class 0 keeps n_max and class C−1 keeps n_max / ratio; which examples is a seeded random
    choice, kept in their original order. The counts are recorded in ``class_counts``, ``mean``
    and ``std`` are recomputed, and the name gets a suffix ``-lt<ratio>``.
    ``imbalance_ratio=1`` on a balanced set returns the same examples in the same order.

    Raises:
        ValueError: a ratio below 1 or not finite, fewer than 2 classes, or a ratio so large
            that a class would keep no example.
    """
    counts = long_tailed_counts(dataset.class_counts, imbalance_ratio)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for idx, n in zip(_class_indices(dataset.train_labels, dataset.num_classes), counts):
        keep.append(idx[torch.randperm(idx.numel(), generator=generator)[:n]])
    keep_all = torch.cat(keep).sort().values
    return _with_train(dataset, keep_all, f"{dataset.name}-lt{imbalance_ratio:g}")


def _stratified(
    labels: torch.Tensor, num_classes: int, size: int, generator: torch.Generator, split: str
) -> torch.Tensor:
    """Sorted indices of ``size`` examples, each class in proportion to its frequency.

    The per-class quotas are rounded by largest remainder (ties to the lower class), so they sum
    to ``size`` exactly; on a balanced set with ``size`` divisible by C every class gets size / C.
    """
    n = labels.numel()
    if not 0 < size <= n:
        raise ValueError(f"{split}_size must be in [1, {n}], got {size}")
    per_class = _class_indices(labels, num_classes)
    exact = [size * idx.numel() / n for idx in per_class]
    quota = [int(math.floor(q)) for q in exact]
    by_remainder = sorted(range(num_classes), key=lambda c: (-(exact[c] - quota[c]), c))
    for c in by_remainder[: size - sum(quota)]:
        quota[c] += 1
    keep = [
        idx[torch.randperm(idx.numel(), generator=generator)[:q]]
        for idx, q in zip(per_class, quota)
    ]
    return torch.cat(keep).sort().values


def subset(
    dataset: Dataset,
    train_size: int | None = None,
    test_size: int | None = None,
    *,
    seed: int = 0,
) -> Dataset:
    """A random, class-stratified subset of the training and/or test set (None keeps a split whole).

    Each class keeps its share of the split (largest-remainder rounding, so the sizes are
    exact), a seeded random choice kept in original order. The training ``mean``/``std`` and
    ``class_counts`` are recomputed; the name gets a suffix ``-sub<train_size>``.

    Raises:
        ValueError: a size outside [1, number of examples in that split].
    """
    generator = torch.Generator().manual_seed(seed)
    result = dataset
    if train_size is not None:
        keep = _stratified(
            dataset.train_labels, dataset.num_classes, train_size, generator, "train"
        )
        result = _with_train(dataset, keep, f"{dataset.name}-sub{train_size}")
    if test_size is not None:
        keep = _stratified(dataset.test_labels, dataset.num_classes, test_size, generator, "test")
        keep = keep.to(dataset.test_images.device)
        result = dataclasses.replace(
            result, test_images=dataset.test_images[keep], test_labels=dataset.test_labels[keep]
        )
    return result
