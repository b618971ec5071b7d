"""The published recipe's plain PyTorch loop, re-implemented faithfully as the speed baseline.

Per image and per epoch: uint8 array -> PIL image -> ``ToTensor()`` -> ``Normalize(0.5, 0.5)``;
``DataLoader(batch_size=100, shuffle=True, num_workers=0)``; each epoch a train phase, then an eval
phase on the test set; SGD(lr 1e-3, momentum 0.9) or Adam(lr 1e-3); StepLR(7, 0.1). Frozen mode
sets requires_grad False on the backbone and leaves the model in train mode, as the reference did
(so BatchNorm statistics drift).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transfer_lightning.network.backbones import create_network


def reference_transform(image_size: int | None = None) -> T.Compose:
    """The reference's per-image transform; ``image_size`` adds a PIL resize in front of it."""
    resize = [T.Resize((image_size, image_size))] if image_size else []
    return T.Compose([*resize, T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


class ReferenceDataset(Dataset):
    """Like torchvision's CIFAR10: uint8 HWC arrays in memory, PIL + transforms per item."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, image_size: int | None = None) -> None:
        self.images, self.labels = images_hwc, labels
        self.transform = reference_transform(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


@dataclass
class ReferenceResult:
    train_images: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    test_accuracy: list[float] = field(default_factory=list)

    @property
    def images_per_sec(self) -> float:
        return self.train_images / self.train_seconds


def reference_model(backbone: str, weights: str | None, num_classes: int, frozen: bool) -> nn.Module:
    ours, parts = create_network(backbone, weights, num_classes)  # loads the weights, replaces the head
    with torch.random.fork_rng():  # its random initialisation is overwritten: leave the seeded stream as it was
        network = torchvision.models.get_model(backbone, num_classes=num_classes)  # torchvision's: none of our hooks
    network.load_state_dict(ours.state_dict())
    head_name = parts.head
    if frozen:
        for name, parameter in network.named_parameters():
            parameter.requires_grad = name.startswith(head_name + ".")
    return network


def run_reference(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    model: nn.Module,
    optimizer_name: str,
    epochs: int,
    device: str,
    max_batches: int | None = None,
    image_size: int | None = None,
) -> ReferenceResult:
    """Train and evaluate like the reference; ``max_batches`` caps the train batches per epoch."""
    start = time.perf_counter()
    model = model.to(device)
    train_loader = DataLoader(ReferenceDataset(*train, image_size), batch_size=100, shuffle=True, num_workers=0)
    test_loader = DataLoader(ReferenceDataset(*test, image_size), batch_size=100, shuffle=False, num_workers=0)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=1e-3, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(parameters, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    criterion = nn.CrossEntropyLoss()
    result = ReferenceResult()
    for _ in range(epochs):
        model.train()
        epoch_start = time.perf_counter()
        for batch_index, (inputs, labels) in enumerate(train_loader):
            if max_batches is not None and batch_index >= max_batches:
                break
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            result.train_images += len(labels)
        _synchronize(device)
        result.train_seconds += time.perf_counter() - epoch_start
        scheduler.step()

        model.eval()
        correct = 0
        with torch.no_grad():
            for inputs, labels in test_loader:
                correct += (model(inputs.to(device)).argmax(1) == labels.to(device)).sum().item()
        result.test_accuracy.append(correct / len(test_loader.dataset))
    result.wall_seconds = time.perf_counter() - start
    return result


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
