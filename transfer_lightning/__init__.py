"""Transfer learning of image classifiers (torchvision's, timm's, the Hugging Face Hub's) with PyTorch Lightning.

The public Python API, for programs that use a plain ``Trainer`` rather than the command line::

    from lightning.pytorch import Trainer
    from transfer_lightning import ImageFolderDataModule, TransferClassifier

    data = ImageFolderDataModule(data_dir="photos", image_size=64, val_size=0.2)
    model = TransferClassifier("resnet18", num_classes=data.num_classes, class_names=data.class_names, task=data.task)
    data.use_weights(model.weights_preprocessing)  # what the command line hands over: mean, std, crop, resampling
    Trainer(max_epochs=3).fit(model, datamodule=data)

(docs/guides/python-api.md has the whole example, run by tests/model/test_api.py.)
"""

from transfer_lightning.data import CIFAR10DataModule, ImageFolderDataModule
from transfer_lightning.model import TransferClassifier
from transfer_lightning.tasks import MulticlassTask, MultilabelTask, Task

__all__ = [
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "MulticlassTask",
    "MultilabelTask",
    "Task",
    "TransferClassifier",
]
__version__ = "0.1.0"
