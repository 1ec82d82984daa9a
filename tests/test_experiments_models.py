"""isample.experiments.models: shapes, parameter counts, ResNet18's layout, a tiny overfit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from isample.experiments import augment, data, models


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("in_channels, size, classes", [(1, 28, 10), (3, 32, 10), (3, 32, 100)])
def test_output_shapes(name, in_channels, size, classes):
    torch.manual_seed(0)
    model = models.build_model(name, classes, in_channels, size)
    out = model(torch.randn(3, in_channels, size, size))
    assert out.shape == (3, classes) and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet18_parameter_count_and_layout():
    model = models.resnet18(num_classes=10)
    assert n_params(model) == 11_173_962  # the CIFAR ResNet18 of the seed paper's lineage
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, models.BasicBlock)]
    assert [b.conv2.out_channels for b in blocks] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [b.conv1.stride[0] for b in blocks] == [1, 1, 2, 1, 2, 1, 2, 1]
    # the head follows the number of classes and the stem the number of input channels
    assert n_params(models.resnet18(100)) - n_params(model) == 90 * (512 + 1)
    assert n_params(model) - n_params(models.resnet18(10, in_channels=1)) == 2 * 64 * 9


def test_small_cnn_parameter_count():
    def expected(c_in: int, side: int, classes: int) -> int:
        convs = c_in * 32 * 9 + 2 * 32 + 32 * 64 * 9 + 2 * 64  # bias-free convs + BN scale/shift
        return convs + 64 * side * side * 128 + 128 + 128 * classes + classes

    assert n_params(models.small_cnn()) == expected(1, 7, 10)
    assert n_params(models.small_cnn(10, in_channels=3, image_size=32)) == expected(3, 8, 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.build_model("vgg", 10, 3, 32)
    with pytest.raises(ValueError, match="num_classes and in_channels must be >= 1"):
        models.resnet18(num_classes=0)
    with pytest.raises(ValueError, match=r"built for 28×28 images, got 32×32"):
        models.small_cnn()(torch.zeros(1, 1, 32, 32))


def test_small_cnn_overfits_64_real_fashion_mnist_images():
    system_dir = data.FASHION_MNIST_SYSTEM_DIR
    if not (system_dir / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not in {system_dir} (apt-get install dataset-fashion-mnist)")
    full = data.load_dataset("fashion-mnist", "/nonexistent-isample-data-dir")
    ds = data.subset(full, train_size=640, seed=0)  # original order: the first 64 mix classes
    x = augment.normalize(ds.train_images[:64], ds.mean, ds.std)
    y = ds.train_labels[:64]
    torch.manual_seed(0)
    model = models.small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.5  # about ln 10 at the start
    assert losses[-1] < 0.25 * losses[0], losses
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9
