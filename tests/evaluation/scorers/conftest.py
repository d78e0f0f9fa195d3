import pytest
import torch

# The builders live in scorer_models.py so that tests can import them by a name no other conftest shares.
from scorer_models import (  # noqa: F401
    bert_tokenizer_dir,
    clip_model_dir,
    clip_processor_dir,
    hps_checkpoint,
    imagereward_dir,
    shape_images,
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine their spinning costs ~5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
