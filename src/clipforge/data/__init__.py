"""Training data from three sources behind one interface: CSV/TSV files, WebDataset shards, synthetic shapes.

    data = build_train_data(DataConfig.from_dict({"type": "csv", "path": "train.csv"}), image_size=224,
                            context_length=77, global_batch_size=256, rank=rank, world_size=world_size)
    ledger = SkipLedger()
    for batch in data.batches(epoch, start_step):  # this rank's [b, 3, S, S] images and [b, L] token ids
        ledger.add(gather_records(batch.skips))  # bad samples, each counted once per epoch, by reason

Bad samples are dropped, never replaced by another row; the reason names (``MISSING_FILE``, ...) are
shared with ``make-shards`` and evaluation. ``webdataset`` is imported only when a webdataset source is built.

Names are imported on first use (PEP 562), so ``clipforge.data.skips`` and ``csv_dataset`` (used by the
collection commands on the onnxruntime path) load without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clipforge.lazy import lazy_attributes

_LAZY = {
    **dict.fromkeys(["BadSample", "CsvSource"], "csv_dataset"),
    **dict.fromkeys(["MAX_CONSECUTIVE_BAD", "TYPES", "Batch", "DataConfig", "MapTrainData", "TrainData",
                     "build_train_data"], "loader"),
    **dict.fromkeys(["BAD_UTF8", "CORRUPT_SHARD", "EMPTY_CAPTION", "MALFORMED_ROW", "MISSING_CAPTION", "MISSING_FILE",
                     "MISSING_IMAGE", "MISSING_SHARD", "REASONS", "UNREADABLE_IMAGE", "SkipLedger", "SkipRecord",
                     "count_reasons", "format_counts", "gather_records", "read_skipped_tsv", "write_skipped_tsv"],
                    "skips"),
    **dict.fromkeys(["EVAL_OFFSET", "SyntheticCaptions", "eval_pairs", "synthetic_pair"], "synthetic"),
}

__all__ = [
    "BAD_UTF8",
    "CORRUPT_SHARD",
    "EMPTY_CAPTION",
    "EVAL_OFFSET",
    "MALFORMED_ROW",
    "MAX_CONSECUTIVE_BAD",
    "MISSING_CAPTION",
    "MISSING_FILE",
    "MISSING_IMAGE",
    "MISSING_SHARD",
    "REASONS",
    "TYPES",
    "UNREADABLE_IMAGE",
    "BadSample",
    "Batch",
    "CsvSource",
    "DataConfig",
    "MapTrainData",
    "SkipLedger",
    "SkipRecord",
    "SyntheticCaptions",
    "TrainData",
    "build_train_data",
    "count_reasons",
    "eval_pairs",
    "format_counts",
    "gather_records",
    "read_skipped_tsv",
    "synthetic_pair",
    "write_skipped_tsv",
]

if TYPE_CHECKING:
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
    from clipforge.data.skips import (
        BAD_UTF8,
        CORRUPT_SHARD,
        EMPTY_CAPTION,
        MALFORMED_ROW,
        MISSING_CAPTION,
        MISSING_FILE,
        MISSING_IMAGE,
        MISSING_SHARD,
        REASONS,
        UNREADABLE_IMAGE,
        SkipLedger,
        SkipRecord,
        count_reasons,
        format_counts,
        gather_records,
        read_skipped_tsv,
        write_skipped_tsv,
    )
    from clipforge.data.synthetic import EVAL_OFFSET, SyntheticCaptions, eval_pairs, synthetic_pair


__getattr__ = lazy_attributes(__name__, _LAZY, "clipforge.data.")
