"""The frozen backbone's BatchNorm statistics recomputed once on the user's training images (``model.adapt_bn_stats``).

ImageNet's statistics describe ImageNet's photos; upsampled CIFAR-10 images give each layer other means and
variances. fastai lets them follow the data by training the BatchNorm layers of its "frozen" body (and their
affine weights). This keeps every weight and only replaces the running statistics, once, before training:
the backbone stays fixed, so the feature cache still computes its features once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from transfer_lightning.data import ImageFolderDataModule, ImageTensorDataset
from transfer_lightning.errors import UserInputError
from transfer_lightning.logs import progress_bar


@torch.no_grad()
def adapt_batchnorm(
    network: nn.Module,
    layers: list[_BatchNorm],
    batches: Iterable[Tensor],
    all_reduce: Callable[[Tensor], Tensor] = lambda total: total,
) -> int:
    """Set the running mean and (unbiased) variance of each of ``layers`` to those of its inputs over every image
    of ``batches``, with ``network`` run as in training: ``layers`` normalise each batch by its own statistics,
    everything else runs in eval mode. ``all_reduce`` sums the totals over processes that each saw a share.

    Not :func:`torch.optim.swa_utils.update_bn`: it resets every BatchNorm of the model (the head's too), and
    averages per-batch variances, which leaves out how batch means vary; these are sums over all images. Each
    batch's mean and variance are the layer's own (with momentum 1 its running statistics are the last batch's):
    summing the inputs again in a hook tripled the pass's time. Returns the number of images."""
    totals = {layer: [0.0, 0.0, 0] for layer in layers}  # sum, sum of squares, values per channel

    def accumulate(layer: _BatchNorm, args: tuple[Tensor, ...], output: Tensor) -> None:
        count, total = output.numel() // output.shape[1], totals[layer]
        mean, variance = layer.running_mean.double(), layer.running_var.double()  # the batch's (unbiased variance)
        total[0] = total[0] + count * mean
        total[1] = total[1] + (count - 1) * variance + count * mean.square()
        total[2] += count

    modes = {module: module.training for module in network.modules()}
    momenta = {layer: layer.momentum for layer in layers}
    hooks = [layer.register_forward_hook(accumulate) for layer in layers]
    images = 0
    try:
        network.eval()
        for layer in layers:
            layer.train()
            layer.momentum = 1.0
        for batch in batches:
            network(batch)
            images += len(batch)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
        for layer, momentum in momenta.items():
            layer.momentum = momentum
    for layer, (total, squares, count) in totals.items():
        total, squares = all_reduce(total), all_reduce(squares)
        count = int(all_reduce(torch.tensor(float(count), dtype=torch.float64)))
        if count == 0:  # a layer no image reached (a branch this network does not take): left as it was
            continue
        mean = total / count
        layer.running_mean.copy_(mean)
        layer.running_var.copy_((squares - count * mean.square()) / max(count - 1, 1))
    return images


def adapt_to_training_images(trainer: pl.Trainer, model: pl.LightningModule) -> None:
    """:func:`adapt_batchnorm` on the frozen backbone of a :class:`~transfer_lightning.model.TransferClassifier`
    over the data module's training images, unaugmented (as validation sees them), on the model's device.

    :class:`~transfer_lightning.network.FrozenBatchNorm` calls this in ``fit``'s ``setup``, not ``on_fit_start``:
    every callback's ``on_fit_start`` (the feature cache's, the EMA's copy) then sees the adapted backbone,
    whatever their order. Lightning moves the model to its device after the setup hooks, so this moves it
    first. A resumed fit adapts again and gets the same statistics: batch statistics do not depend on the
    running ones.
    """
    datamodule = trainer.datamodule
    if not isinstance(datamodule, ImageFolderDataModule):
        raise UserInputError("model.adapt_bn_stats reads the training images of transfer_lightning's data module.")
    start = time.perf_counter()
    model.to(trainer.strategy.root_device)
    images, all_reduce = datamodule.train_set, lambda total: total
    if not isinstance(images, ImageTensorDataset):  # a stream: each rank reads its share, the sums are joined
        images = datamodule.source.share("train", 0, datamodule.hparams.num_workers)
        all_reduce = lambda total: trainer.strategy.reduce(total.to(model.device), reduce_op="sum").cpu()  # noqa: E731
    batch_size, transform = datamodule.hparams.batch_size, datamodule.batch_transform
    batches = (transform(chunk.to(model.device), train=False) for chunk, _ in images.batches(batch_size))
    description = "Adapting the BatchNorm statistics"
    batches = progress_bar(
        batches, total=-(-len(images) // batch_size), desc=description, disable=not trainer.is_global_zero
    )
    layers = model.frozen.batchnorms()
    count = adapt_batchnorm(model, layers, batches, all_reduce)
    rank_zero_info(
        f"BatchNorm adaptation: the running statistics of {len(layers)} frozen layers recomputed on {count} "
        f"training images in {time.perf_counter() - start:.1f} s; the weights are unchanged."
    )
