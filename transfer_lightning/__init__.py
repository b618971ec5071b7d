"""Transfer learning of torchvision image classifiers with PyTorch Lightning."""

from transfer_lightning.data import CIFAR10DataModule, ImageFolderDataModule
from transfer_lightning.model import TransferClassifier

__all__ = ["CIFAR10DataModule", "ImageFolderDataModule", "TransferClassifier"]
__version__ = "0.1.0"
