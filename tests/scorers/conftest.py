# The builders live in scorer_models.py so that tests can import them by a name no other conftest shares.
from scorer_models import (  # noqa: F401
    bert_tokenizer_dir,
    clip_model_dir,
    clip_processor_dir,
    hps_checkpoint,
    imagereward_dir,
    shape_images,
)
