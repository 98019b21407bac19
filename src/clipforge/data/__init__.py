"""Training data from three sources behind one interface: CSV/TSV files, WebDataset shards, synthetic shapes.

    data = build_train_data(DataConfig.from_dict({"type": "csv", "path": "train.csv"}), image_size=224,
                            context_length=77, global_batch_size=256, rank=rank, world_size=world_size)
    for batch in data.batches(epoch, start_step):  # this rank's [b, 3, S, S] images and [b, L] token ids
        ...  # batch.skipped: bad samples met while building this batch, by reason

``webdataset`` is imported only when a webdataset source is built.
"""

from clipforge.data.csv_dataset import BadSample, CsvSource
from clipforge.data.loader import (
    MAX_CONSECUTIVE_BAD,
    TYPES,
    Batch,
    DataConfig,
    MapTrainData,
    TrainData,
    build_train_data,
)
from clipforge.data.synthetic import EVAL_OFFSET, SyntheticCaptions, eval_pairs, synthetic_pair

__all__ = [
    "EVAL_OFFSET",
    "MAX_CONSECUTIVE_BAD",
    "TYPES",
    "BadSample",
    "Batch",
    "CsvSource",
    "DataConfig",
    "MapTrainData",
    "SyntheticCaptions",
    "TrainData",
    "build_train_data",
    "eval_pairs",
    "synthetic_pair",
]
