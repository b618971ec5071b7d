"""The private APIs of dependencies that the package still uses (docs/architecture.md lists them with the version
each was checked on): each checked here to exist and to do what the package relies on, so that a release that
drops or changes one fails a test that names it. LightningCLI's three methods, LitData's S3 client and LitServe's
routes are guarded by the tests named in that list, which run them end to end."""

import litdata.streaming.downloader
import pytest
from lightning.pytorch.callbacks import LearningRateFinder
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from transfer_lightning.data.storage import storage_provider
from transfer_lightning.training.dashboards import hparams_summaries


def test_tensorboards_file_writer_takes_the_hparams_summaries(tmp_path):
    """training/dashboards.py writes the HParams table's summaries through ``SummaryWriter._get_file_writer``."""
    writer = SummaryWriter(tmp_path)
    for summary in hparams_summaries({"lr": 0.01}, {"hparams/test_acc": 0.0}):
        writer._get_file_writer().add_summary(summary)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events.PluginTagToContent("hparams"))


def test_lightnings_lr_finder_keeps_the_steps_it_was_given():
    """commands/lr_find.py shortens the range test by setting ``LearningRateFinder._num_training_steps``."""
    assert LearningRateFinder(num_training_steps=37)._num_training_steps == 37


@pytest.mark.parametrize("size", [10, 11, 12])
def test_unrepeated_sampler_shows_each_image_to_exactly_one_process(size):
    """data/datasets.py evaluates under DDP with ``lightning.pytorch.overrides.distributed``'s sampler."""
    shares = [list(UnrepeatedDistributedSampler(range(size), num_replicas=3, rank=r, shuffle=False)) for r in range(3)]
    assert sorted(index for share in shares for index in share) == list(range(size))


def test_litdatas_object_store_client_and_its_options_are_where_they_were():
    """data/storage.py reaches LitData's ``_get_fs_provider`` and sets ``downloader._OBSTORE_CLIENT_OPTIONS``."""
    assert isinstance(litdata.streaming.downloader._OBSTORE_CLIENT_OPTIONS, dict)
    provider = storage_provider("s3://bucket/data", {"endpoint_url": "http://127.0.0.1:9"}, patient=False)
    for method in ("upload_file", "download_file", "delete_file_or_directory", "is_empty"):
        assert callable(getattr(provider, method))


def test_our_pair_reads_conv2d_arguments_as_torchs_private_one_did():
    """network/depthwise.py's ``pair`` replaced ``torch.nn.modules.utils._pair``."""
    from transfer_lightning.network.depthwise import pair

    assert pair(2) == (2, 2)
    assert pair((1, 3)) == (1, 3)
    assert pair([0, 1]) == (0, 1)
