"""Recipe options: per-step schedules, label smoothing, no weight decay on normalisation layers and biases."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from tests.conftest import assert_test_scores_by_hand
from tests.model.test_model import datamodule_for, make_trainer
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.data.transforms import Preprocessing
from transfer_lightning.errors import UserInputError
from transfer_lightning.inference.export import ExportedClassifier
from transfer_lightning.model import TransferClassifier
from transfer_lightning.network.freezing import FrozenBatchNorm, batchnorms, run_folded
from transfer_lightning.reporting.runs import read_run
from transfer_lightning.schedules import WarmupCosineLR
from transfer_lightning.training.feature_cache import FrozenFeatureCache

SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
STEPS = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.log_every_n_steps=1"]
STEPS += ["--test_after_fit=false", "--model.optimizer=SGD", "--model.optimizer.lr=0.1"]


def fit(small_run_args: list[str], *args: str) -> TransferLightningCLI:
    return TransferLightningCLI(args=["fit", *small_run_args, *STEPS, *args])


def test_warmup_cosine_steps_per_optimizer_step_from_the_config(small_run_args, run_dir):
    scheduler = ["--model.scheduler=transfer_lightning.schedules.WarmupCosineLR", "--model.scheduler.warmup_steps=2"]
    cli = fit(small_run_args, *scheduler, "--model.scheduler_interval=step")
    assert cli.trainer.lr_scheduler_configs[0].interval == "step"

    # What torch's own schedulers give over the run's 6 optimizer steps (total_steps filled in by the model).
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = SequentialLR(
        optimizer,
        [LinearLR(optimizer, 0.01, 1.0, total_iters=2), CosineAnnealingLR(optimizer, T_max=4)],
        milestones=[2],
    )
    expected = []
    for _ in range(6):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    logged = read_run(run_dir / "lightning_logs" / "version_0").scalars["lr-SGD"]
    assert logged == pytest.approx(expected, rel=1e-6)  # logged once per step, before the step


def test_one_cycle_without_total_steps_gets_the_whole_run(small_run_args, run_dir):
    scheduler = ["--model.scheduler=torch.optim.lr_scheduler.OneCycleLR", "--model.scheduler.max_lr=0.1"]
    cli = fit(small_run_args, *scheduler, "--model.scheduler_interval=step")
    one_cycle = cli.trainer.lr_scheduler_configs[0].scheduler
    assert one_cycle.total_steps == 6 and one_cycle.last_epoch == 6
    logged = read_run(run_dir / "lightning_logs" / "version_0").scalars["lr-SGD"]
    assert len(logged) == 6 and max(logged) == pytest.approx(0.1, rel=0.05)  # the peak: max_lr
    assert logged[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-3)  # the last step: the end of the cycle


def test_epoch_interval_schedules_count_epochs(small_run_args, run_dir):
    scheduler = ["--model.scheduler=transfer_lightning.optim.WarmupCosineLR", "--model.scheduler.warmup_steps=1"]
    cli = fit(small_run_args, *scheduler)
    assert cli.trainer.lr_scheduler_configs[0].interval == "epoch"
    assert cli.trainer.lr_scheduler_configs[0].scheduler._schedulers[1].T_max == 1  # 2 epochs, 1 of warmup
    assert len(read_run(run_dir / "lightning_logs" / "version_0").scalars["lr-SGD"]) == 2


def test_bad_schedule_settings_are_clear_errors():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UserInputError, match="warmup_steps"):
        WarmupCosineLR(optimizer, warmup_steps=6, total_steps=6)
    with pytest.raises(UserInputError, match="scheduler_interval"):
        TransferClassifier(weights=None, scheduler_interval="batch")
    with pytest.raises(UserInputError, match="label_smoothing"):
        TransferClassifier(weights=None, label_smoothing=1.0)


def test_label_smoothing_is_in_the_training_loss_only():
    model = TransferClassifier(backbone="resnet18", weights=None, num_classes=4, label_smoothing=0.2)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    model.eval()  # the same logits in both calls
    with torch.no_grad():
        logits = model(images)
        loss = model.training_step((images, labels), 0)
    assert loss == pytest.approx(float(F.cross_entropy(logits, labels, label_smoothing=0.2)), rel=1e-6)
    assert loss != pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-3)


@pytest.mark.parametrize("freeze", [False, True])
def test_no_weight_decay_on_norm_and_bias(freeze):
    model = TransferClassifier(
        backbone="mobilenet_v2",
        weights=None,
        num_classes=3,
        freeze_backbone=freeze,
        no_weight_decay_on_norm_and_bias=True,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05),
    )
    decayed, exempt = model.configure_optimizers().param_groups
    assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {names[id(p)] for p in decayed["params"] + exempt["params"]} == trainable
    assert all(p.ndim > 1 for p in decayed["params"])  # convolution and linear weights only
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    batchnorm_parameters = {id(p) for m in batchnorms for p in m.parameters()}
    assert all(names[id(p)].endswith(".bias") or id(p) in batchnorm_parameters for p in exempt["params"])
    expected_exempt = 1 if freeze else 2 * 52 + 1  # the head's bias; or 52 BatchNorms' weight and bias too
    assert len(exempt["params"]) == expected_exempt

    plain = TransferClassifier(backbone="mobilenet_v2", weights=None, num_classes=3, freeze_backbone=freeze)
    assert len(plain.configure_optimizers().param_groups) == 1


# --- gradual unfreezing --------------------------------------------------------------------------


class RecordEpochs(pl.Callback):
    """Per training epoch: whether the backbone trains, its BatchNorm mode, and each group's learning rate."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            conv = pl_module.network.conv1.weight
            self.epochs[trainer.current_epoch] = {
                "trains": conv.requires_grad,
                "bn_training": pl_module.network.bn1.training,
                "lrs": {group["name"]: group["lr"] for group in trainer.optimizers[0].param_groups},
                "conv": conv.detach().clone(),
            }


def unfreezing_run(image_folder, tmp_path, max_epochs: int = 4, ckpt_path: str | None = None):
    pl.seed_everything(3)
    model = TransferClassifier(
        weights=None,
        num_classes=4,
        freeze_backbone=True,
        unfreeze_at_epoch=2,
        backbone_lr_scale=0.1,
        optimizer=SGD,
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    recorder = RecordEpochs()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = make_trainer(tmp_path, max_epochs=max_epochs, enable_checkpointing=True, limit_val_batches=1)
    trainer.callbacks.extend([recorder, checkpoints])
    trainer.fit(model, datamodule_for(image_folder, tmp_path), ckpt_path=ckpt_path)
    return model, recorder


def test_gradual_unfreezing_at_the_set_epoch_with_the_set_learning_rates(image_folder, tmp_path):
    model, record = unfreezing_run(image_folder, tmp_path)
    epochs = record.epochs
    assert [epochs[e]["trains"] for e in range(4)] == [False, False, True, True]
    assert [epochs[e]["bn_training"] for e in range(4)] == [False, False, True, True]
    for epoch in range(4):  # the same two groups throughout; the backbone at 0.1 x the head, both scheduled
        assert epochs[epoch]["lrs"] == pytest.approx({"head": 0.1 * 0.5**epoch, "backbone": 0.01 * 0.5**epoch})
    assert torch.equal(epochs[0]["conv"], epochs[2]["conv"])  # frozen until epoch 2
    assert not torch.equal(epochs[2]["conv"], epochs[3]["conv"])  # trained from epoch 2 on
    assert not torch.equal(epochs[3]["conv"], model.network.conv1.weight)


@pytest.mark.parametrize("checkpoint", ["epoch=0.ckpt", "epoch=2.ckpt"], ids=["before-unfreezing", "after"])
def test_resuming_continues_frozen_or_unfrozen_as_the_uninterrupted_run(image_folder, tmp_path, checkpoint):
    uninterrupted, full = unfreezing_run(image_folder, tmp_path / "full")
    resumed, rest = unfreezing_run(
        image_folder, tmp_path / "resumed", ckpt_path=str(tmp_path / "full" / "ckpt" / checkpoint)
    )
    first = int(checkpoint[6]) + 1
    assert sorted(rest.epochs) == list(range(first, 4))
    for epoch in rest.epochs:
        for key in ("trains", "bn_training"):
            assert rest.epochs[epoch][key] == full.epochs[epoch][key], (epoch, key)
        assert rest.epochs[epoch]["lrs"] == pytest.approx(full.epochs[epoch]["lrs"])
        torch.testing.assert_close(rest.epochs[epoch]["conv"], full.epochs[epoch]["conv"])
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_unfreezing_needs_a_frozen_backbone():
    with pytest.raises(UserInputError, match="freeze_backbone"):
        TransferClassifier(weights=None, unfreeze_at_epoch=2)


# --- partial fine-tuning -------------------------------------------------------------------------


def module_state(model: TransferClassifier, prefix: str) -> dict[str, torch.Tensor]:
    """The weights and BatchNorm buffers of the network's modules named ``prefix...``, copied."""
    return {k: v.clone() for k, v in model.network.state_dict().items() if k.startswith(prefix)}


def test_trainable_from_freezes_the_modules_before_it(image_folder, tmp_path):
    model = TransferClassifier(weights=None, num_classes=4, trainable_from="layer3", optimizer=SGD)
    assert model.frozen.always_frozen == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    early, late = module_state(model, "layer2"), module_state(model, "layer3")
    stem = module_state(model, "bn1")
    make_trainer(tmp_path).fit(model, datamodule_for(image_folder, tmp_path))

    # Before layer3 nothing moved, running statistics included (BatchNorm in eval mode); from it on all trained.
    for before, prefix in ((early, "layer2"), (stem, "bn1")):
        after = module_state(model, prefix)
        assert all(torch.equal(value, after[key]) for key, value in before.items()), prefix
    after = module_state(model, "layer3")
    assert all(not torch.equal(value, after[key]) for key, value in late.items() if "num_batches" not in key)
    assert not model.network.layer2[0].bn1.training and model.network.layer3[0].bn1.training
    optimized = {id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in optimized for p in model.network.layer2.parameters())


class FoldedForward(pl.Callback):
    """Records, per stage, which network modules run a replaced (BatchNorm-folded) forward."""

    def __init__(self) -> None:
        self.seen: dict[str, set[str]] = {}

    def record(self, stage: str, pl_module: TransferClassifier) -> None:
        replaced = {name for name, module in pl_module.network.named_modules() if "forward" in module.__dict__}
        self.seen.setdefault(stage, set()).update(replaced)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record("train", pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.record("val", pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.record("test", pl_module)


def test_modules_before_trainable_from_run_with_batchnorm_folded(image_folder, tmp_path):
    model = TransferClassifier(weights=None, num_classes=4, trainable_from="layer3", optimizer=SGD)
    folded = FoldedForward()
    trainer = make_trainer(tmp_path, callbacks=[folded])
    datamodule = datamodule_for(image_folder, tmp_path)
    trainer.fit(model, datamodule)
    trainer.test(model, datamodule)
    # layer1 and layer2 hold conv-BN pairs; conv1 and bn1 are separate modules, with nothing to fold inside.
    assert folded.seen == {stage: {"layer1", "layer2"} for stage in ("train", "val", "test")}
    assert not any("forward" in module.__dict__ for module in model.modules())  # undone after each stage

    # The folded forward computes the same function, and state_dict keys are untouched. Statistics
    # and affine parameters away from BatchNorm's initial identity, so that a wrong fold shows.
    generator = torch.Generator().manual_seed(0)
    for batchnorm in batchnorms(model.network):
        for tensor, (low, high) in zip(
            (batchnorm.running_mean, batchnorm.running_var, batchnorm.weight.data, batchnorm.bias.data),
            ((-1, 1), (0.5, 2), (0.5, 1.5), (-1, 1)),
            strict=True,
        ):
            tensor.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))
    images = torch.rand(6, 3, 32, 32)
    model.eval()
    keys = model.state_dict().keys()
    with torch.no_grad():
        plain = model(images)
        FrozenBatchNorm().on_test_start(trainer, model)
        assert isinstance(model.network.layer1.forward.__self__, torch.fx.GraphModule)
        assert model.state_dict().keys() == keys
        torch.testing.assert_close(model(images), plain, rtol=1e-4, atol=1e-5)
        FrozenBatchNorm().on_test_end(trainer, model)


def test_folding_again_folds_the_current_weights():
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    images = torch.rand(2, 3, 8, 8)
    run_folded([block])
    block[1].running_mean.fill_(1.0)  # e.g. weights loaded after a stage that ended in an error
    run_folded([block])
    torch.testing.assert_close(block(images), torch.nn.Sequential.forward(block, images), rtol=1e-4, atol=1e-5)


def test_no_folding_while_frozen_batchnorm_statistics_move(image_folder, tmp_path):
    model = TransferClassifier(
        weights=None, num_classes=4, trainable_from="layer3", update_bn_stats=True, optimizer=SGD
    )
    folded = FoldedForward()
    make_trainer(tmp_path, callbacks=[folded]).fit(model, datamodule_for(image_folder, tmp_path))
    assert folded.seen["train"] == set()


def test_gradual_unfreezing_stops_at_trainable_from(image_folder, tmp_path):
    model = TransferClassifier(
        weights=None, num_classes=4, freeze_backbone=True, unfreeze_at_epoch=1, trainable_from="layer4", optimizer=SGD
    )
    make_trainer(tmp_path).fit(model, datamodule_for(image_folder, tmp_path))
    assert all(p.requires_grad for p in model.network.layer4.parameters())
    assert not any(p.requires_grad for p in model.network.layer3.parameters())
    assert [bn.training for bn in (model.network.layer3[1].bn2, model.network.layer4[0].bn1)] == [False, True]
    groups = {group["name"]: group["params"] for group in model.trainer.optimizers[0].param_groups}
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in model.network.layer4.parameters()}


def test_bad_trainable_from_is_a_clear_error():
    with pytest.raises(UserInputError, match="'layer5' is not a module of the network. Did you mean layer4"):
        TransferClassifier(weights=None, trainable_from="layer5")
    with pytest.raises(UserInputError, match="freeze_backbone: true trains only the head"):
        TransferClassifier(weights=None, freeze_backbone=True, trainable_from="layer4")


# --- flip test-time augmentation -----------------------------------------------------------------


def test_tta_flip_averages_the_probabilities_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = TransferClassifier(weights=None, num_classes=4, tta_flip=True).eval()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = (model(images).softmax(-1) + model(images.flip(-1)).softmax(-1)) / 2
        got = model.evaluation_logits(images).softmax(-1)
        plain = TransferClassifier(weights=None, num_classes=4).eval()
        plain.load_state_dict(model.state_dict())
        assert torch.allclose(plain.evaluation_logits(images), model(images))  # off: the plain logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, model(images).softmax(-1))

    # Exported models average the same way.
    preprocessing = Preprocessing((32, 32), "resize", None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    uint8 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        exported = ExportedClassifier(model.network, preprocessing, model.task, tta_flip=True).eval()(uint8)
        lightning = model.evaluation_logits(preprocessing(uint8)).softmax(-1)
    torch.testing.assert_close(exported, lightning)


def test_feature_cache_is_off_with_tta_flip(image_folder, tmp_path):
    model = TransferClassifier(weights=None, num_classes=4, freeze_backbone=True, tta_flip=True)
    assert "tta_flip" in FrozenFeatureCache().reason_not_to_cache(model, datamodule_for(image_folder, tmp_path))


# --- recipe configs ------------------------------------------------------------------------------

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "recipes").glob("*.yaml"))


@pytest.mark.filterwarnings("ignore:model.scheduler .* has T_max")  # the recipes are cut to 2 epochs here
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_configs_run_and_comment_every_setting(recipe, small_run_args, run_dir):
    settings = [line for line in recipe.read_text().splitlines() if ":" in line and not line.lstrip().startswith("#")]
    uncommented = [line for line in settings if line.split(":", 1)[1].strip() and "#" not in line]
    assert not uncommented, f"settings without a comment in {recipe.name}: {uncommented}"
    shrink = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    shrink += ["--trainer.limit_test_batches=0.5", "--data.image_size=64"]
    if "warmup_steps" in recipe.read_text():  # 4 optimizer steps in all here
        shrink.append("--model.scheduler.warmup_steps=1")
    if "head_solver: lbfgs" in recipe.read_text():
        # A random MobileNetV2 gives these images near-constant features, whose gradients are below L-BFGS's
        # tolerance from the start (Adam rescales them); a random ResNet18's features carry their colours.
        shrink.append("--model.backbone=resnet18")
    cli = TransferLightningCLI(args=["fit", f"--config={recipe}", *small_run_args, *shrink])
    assert cli.trainer.current_epoch == 2
    # The test score is the network's own on its test batch (with the mirror images where the recipe says so).
    assert_test_scores_by_hand(cli, batches=1, autocast=cli.trainer.precision == "bf16-mixed")
