"""The dataset registry: one module per data set, found by the one name configs, manifests and command
lines use, and the one source of what the pipeline does with each."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from dataloaders import DataConfig, get_dataset, list_datasets
from dataloaders.transforms import augment, normalize, output_shape


def test_the_datasets_are_registered_by_one_name():
    assert list_datasets() == ["cifar10", "cifar100", "cifar10dvs", "digits", "folder", "imagenet"]
    assert [get_dataset(d).name for d in list_datasets()] == list_datasets()
    with pytest.raises(KeyError, match="unknown dataset 'cifar10-dvs'"):
        get_dataset("cifar10-dvs")
    with pytest.raises(KeyError, match="unknown dataset 'mnist'"):
        get_dataset("mnist")
    with pytest.raises(ValueError, match="expected one of"):
        DataConfig(dataset="mnist")


def test_each_module_decides_augmentation_normalisation_and_shape():
    cifar, digits = DataConfig(dataset="cifar10"), DataConfig(dataset="digits")
    kinds = [type(op) for op in augment(cifar, True, 32, False).transforms]
    assert kinds == [v2.RandomCrop, v2.RandomHorizontalFlip]
    assert [type(op) for op in augment(digits, True, 16, False).transforms] == [v2.RandomCrop]
    assert augment(cifar, False, 32, False) is None
    net = DataConfig(dataset="imagenet", image_size=64, val_crop=56)
    assert [type(op) for op in augment(net, True, 0, True).transforms] == [v2.AutoAugment]
    assert output_shape(net, None, True) == (3, 64, 64) and output_shape(net, None, False) == (3, 56, 56)
    assert output_shape(DataConfig(dataset="cifar10dvs"), [20, 2, 128, 128], True) == (20, 2, 128, 128)

    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    spec = get_dataset("digits")
    expected = (x.float() / 255 - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)
    assert torch.allclose(normalize(digits, {})(x), expected, atol=1e-5)
    counts = torch.randint(0, 9, (2, 20, 2, 8, 8), dtype=torch.int32).to(torch.uint16)
    assert torch.equal(normalize(DataConfig(dataset="cifar10dvs"), {})(counts), counts.float())


def test_sequence_data_goes_to_the_model_time_first():
    from dataloaders.loader import InMemory, model_input
    from models import create_model
    from trainer.evaluate import evaluate

    assert [d for d in list_datasets() if get_dataset(d).time_first] == ["cifar10dvs"]
    batch = torch.arange(2 * 3 * 2 * 4 * 4, dtype=torch.float32).view(2, 3, 2, 4, 4)  # [N, T, C, H, W]
    assert torch.equal(model_input(batch, torch.device("cpu"), torch.float32, True), batch.transpose(0, 1))
    assert torch.equal(model_input(batch[:, 0], torch.device("cpu"), torch.float32, False), batch[:, 0])
    # Evaluation drops padding rows along the batch axis of the time-first tensor.
    torch.manual_seed(0)
    model = create_model("ms_resnet20_dvs", num_classes=10, T=3, in_channels=2, widths=[4, 8, 8])
    x, y = torch.rand(4, 3, 2, 32, 32), torch.tensor([1, -1, 2, 3])
    got = evaluate(model, InMemory([(x, y)], time_first=True), torch.device("cpu"), spikes=False)
    alone = evaluate(model, InMemory([(x[[0, 2, 3]], y[[0, 2, 3]])], time_first=True), torch.device("cpu"),
                     spikes=False)
    assert got["val/samples"] == 3 and got == alone
