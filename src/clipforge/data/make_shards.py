"""Turn a CSV/TSV of image paths and captions into WebDataset tar shards, as img2dataset lays them out.

Each sample is ``{key}.jpg`` (or ``.png``/``.webp``: the original file's bytes, never re-encoded),
``{key}.txt`` (the caption) and ``{key}.json`` (the original row, its row number and its source);
keys are zero-padded running numbers, unique across shards. A row is skipped exactly when training
on the same table would skip it, under the same reason and the same name (``/abs/table.csv:LINE``):
each is listed in ``out_dir/skipped.tsv`` and counted in the summary, so the shards then train with
no skips at all. ``--image-root`` and ``--split`` mean what ``data.image_root`` and ``data.split`` mean.

    python -m clipforge.data.make_shards captions.tsv shards/ --image-column image --caption-column caption \\
        --image-root images --split train
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from clipforge.data.csv_dataset import BadSample, CsvSource, file_problem
from clipforge.data.skips import UNREADABLE_IMAGE, SkipRecord, count_reasons, format_counts, write_skipped_tsv
from clipforge.errors import ClipforgeError, ConfigError
from clipforge.transforms import image_transform

__all__ = ["SKIPPED_TSV", "ShardSummary", "csv_to_shards", "main", "write_shards"]

KEEP_AS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}  # other formats become PNG
KEY_DIGITS = 9
SKIPPED_TSV = "skipped.tsv"


def _image_bytes(path: str) -> tuple[bytes, str] | str:
    """The file's own bytes and extension (a PNG re-encoding for other formats), or why training would skip it.

    The image is decoded and put through the (eval) transform, so a file enters a shard only if the
    training transform can use it.
    """
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:  # decode fully: a corrupt file must not enter a shard
            image.load()
            image_transform(16)(image)
            extension = KEEP_AS.get(Path(path).suffix.lower())
            if extension is not None:
                return data, extension
            out = io.BytesIO()
            image.save(out, format="PNG")
            return out.getvalue(), "png"
    except Exception:  # noqa: BLE001 (unreadable file or undecodable image: a skip, never a crash)
        return file_problem(path) or UNREADABLE_IMAGE


@dataclass
class ShardSummary:
    paths: list[Path]  # the tar files written, in order
    samples: int  # samples written
    skipped: dict[str, int]  # reason -> rows left out
    records: list[SkipRecord]  # each row left out (epoch 0), as listed in skipped_tsv
    skipped_tsv: Path  # out_dir/skipped.tsv
    rows: int = 0  # rows read (those of --split only)


def write_shards(csv_path: str | Path, out_dir: str | Path, *, samples_per_shard: int = 1000,
                 image_column: str = "filepath", caption_column: str = "title", separator: str | None = None,
                 image_root: str | None = None, split: str | None = None,
                 split_column: str = "split") -> ShardSummary:
    """Write ``out_dir/00000.tar, 00001.tar, ...`` and ``skipped.tsv``; say what was written and skipped."""
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
    source = CsvSource(csv_path, image_column=image_column, caption_column=caption_column, separator=separator,
                       keep_rows=True, image_root=image_root, split=split, split_column=split_column)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[SkipRecord] = []
    written: list[Path] = []
    total = 0
    read = functools.lru_cache(maxsize=8)(_image_bytes)  # Flickr8k-style tables repeat an image on adjacent rows
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=samples_per_shard, verbose=0,
                         post=lambda name: written.append(Path(name))) as sink:
        for row in range(len(source)):
            try:
                loaded = read(source.check(row))
            except BadSample as bad:
                loaded = bad.reason
            name, detail = source.name(row)
            if isinstance(loaded, str):
                records.append(SkipRecord(0, name, loaded, detail))
                continue
            data, extension = loaded
            record = {"row": row, "source": name, **dict(zip(source.header, source.rows[row]))}  # type: ignore[index]
            sink.write({"__key__": f"{total:0{KEY_DIGITS}d}", extension: data, "txt": source.captions[row],
                        "json": json.dumps(record).encode("utf-8")})
            total += 1
    tsv = write_skipped_tsv(records, out / SKIPPED_TSV)
    skipped = count_reasons(records)
    if total == 0:
        for path in written:
            path.unlink(missing_ok=True)
        raise ClipforgeError(f"no usable rows in '{csv_path}' (skipped: {format_counts(skipped)}; each listed in "
                             f"{tsv}); check the columns, --image-root and the image paths")
    return ShardSummary(written, total, skipped, records, tsv, len(source))


def csv_to_shards(csv_path: str | Path, out_dir: str | Path, *, samples_per_shard: int = 1000,
                  image_column: str = "filepath", caption_column: str = "title", separator: str | None = None,
                  image_root: str | None = None, split: str | None = None) -> list[Path]:
    """Write the shards; returns their paths (``write_shards`` also gives the counts)."""
    return write_shards(csv_path, out_dir, samples_per_shard=samples_per_shard, image_column=image_column,
                        caption_column=caption_column, separator=separator, image_root=image_root,
                        split=split).paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the shards and print a summary; returns the exit status (0 ok)."""
    parser = argparse.ArgumentParser(prog="clipforge make-shards",
                                     description="Write a CSV/TSV of images and captions as WebDataset tar shards; "
                                                 "rows training would skip are left out and listed in "
                                                 "OUT_DIR/skipped.tsv.")
    parser.add_argument("csv", help="CSV/TSV file with a header row")
    parser.add_argument("out_dir", help="folder for 00000.tar, 00001.tar, ... and skipped.tsv")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-column", default="filepath")
    parser.add_argument("--caption-column", default="title")
    parser.add_argument("--separator", default=None, help="one character, or 'tab'; default: tab for .tsv, comma")
    parser.add_argument("--image-root", default=None,
                        help="folder the image paths are relative to (default: the table's folder), as data.image_root")
    parser.add_argument("--split", default=None,
                        help="keep only rows whose split column equals this, e.g. train (as data.split)")
    parser.add_argument("--split-column", default="split", help="the column --split reads (default: split)")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)  # read by the clipforge command
    args = parser.parse_args(argv)
    separator = {"\\t": "\t", "tab": "\t"}.get(args.separator, args.separator)
    summary = write_shards(args.csv, args.out_dir, samples_per_shard=args.samples_per_shard,
                           image_column=args.image_column, caption_column=args.caption_column, separator=separator,
                           image_root=args.image_root, split=args.split, split_column=args.split_column)
    last = len(summary.paths) - 1
    pattern = str(Path(args.out_dir) / f"{{00000..{last:05d}}}.tar") if last else str(summary.paths[0])
    print(f"wrote {summary.samples} samples in {len(summary.paths)} shard(s) of up to {args.samples_per_shard} "
          f"in {args.out_dir}")
    print(f"skipped {len(summary.records)} rows (of {summary.rows}): {format_counts(summary.skipped)}"
          + (f"; each listed in {summary.skipped_tsv}" if summary.records else ""))
    print(f"train with: data.type = \"webdataset\", data.path = \"{pattern}\", data.num_samples = {summary.samples}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ClipforgeError as error:
        print(f"clipforge make-shards: error: {error}", file=sys.stderr)
        sys.exit(2)
