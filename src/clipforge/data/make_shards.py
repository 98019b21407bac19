"""Turn a CSV/TSV of image paths and captions into WebDataset tar shards, as img2dataset lays them out.

Each sample is ``{key}.jpg`` (or ``.png``/``.webp``: the original file's bytes, never re-encoded),
``{key}.txt`` (the caption) and ``{key}.json`` (the original row and its row number); keys are
zero-padded running numbers, unique across shards. Rows whose caption or image is unusable are
skipped and counted, exactly as training would skip them.

    python -m clipforge.data.make_shards train.csv shards/ --samples-per-shard 1000
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from clipforge.data.csv_dataset import BadSample, CsvSource
from clipforge.errors import ClipforgeError, ConfigError

__all__ = ["ShardSummary", "csv_to_shards", "main", "write_shards"]

KEEP_AS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}  # other formats become PNG
KEY_DIGITS = 9


def _image_bytes(path: str) -> tuple[bytes, str]:
    """The file's own bytes and extension, or a PNG re-encoding for formats img2dataset does not use."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:  # decode fully: a corrupt file must not enter a shard
        image.load()
        extension = KEEP_AS.get(Path(path).suffix.lower())
        if extension is not None:
            return data, extension
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue(), "png"


@dataclass
class ShardSummary:
    paths: list[Path]  # the tar files written, in order
    samples: int  # samples written
    skipped: dict[str, int]  # reason -> rows left out


def write_shards(csv_path: str | Path, out_dir: str | Path, *, samples_per_shard: int = 1000,
                 image_column: str = "filepath", caption_column: str = "title",
                 separator: str | None = None) -> ShardSummary:
    """Write ``out_dir/00000.tar, 00001.tar, ...`` and say what was written and what was skipped."""
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
    source = CsvSource(csv_path, image_column=image_column, caption_column=caption_column, separator=separator,
                       keep_rows=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, int] = {}
    written: list[Path] = []
    total = 0
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=samples_per_shard, verbose=0,
                         post=lambda name: written.append(Path(name))) as sink:
        for row in range(len(source)):
            try:
                data, extension = _image_bytes(source.check(row))
            except BadSample as bad:
                reason = bad.reason
            except FileNotFoundError:
                reason = "missing_image"
            except Exception:  # noqa: BLE001 (unreadable file or undecodable image)
                reason = "unreadable_image"
            else:
                record = {"row": row, **dict(zip(source.header, source.rows[row]))}  # type: ignore[index]
                sink.write({"__key__": f"{total:0{KEY_DIGITS}d}", extension: data, "txt": source.captions[row],
                            "json": json.dumps(record).encode("utf-8")})
                total += 1
                continue
            skipped[reason] = skipped.get(reason, 0) + 1
    if total == 0:
        for path in written:
            path.unlink(missing_ok=True)
        raise ClipforgeError(f"no usable rows in '{csv_path}' (skipped: {skipped or 'none'}); check the columns "
                             "and the image paths")
    return ShardSummary(written, total, skipped)


def csv_to_shards(csv_path: str | Path, out_dir: str | Path, *, samples_per_shard: int = 1000,
                  image_column: str = "filepath", caption_column: str = "title",
                  separator: str | None = None) -> list[Path]:
    """Write the shards; returns their paths (``write_shards`` also gives the counts)."""
    return write_shards(csv_path, out_dir, samples_per_shard=samples_per_shard, image_column=image_column,
                        caption_column=caption_column, separator=separator).paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the shards and print a summary; returns the exit status (0 ok)."""
    parser = argparse.ArgumentParser(prog="clipforge make-shards",
                                     description="Write a CSV/TSV of images and captions as WebDataset tar shards.")
    parser.add_argument("csv", help="CSV/TSV file with a header row; image paths relative to its folder")
    parser.add_argument("out_dir", help="folder for 00000.tar, 00001.tar, ...")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-column", default="filepath")
    parser.add_argument("--caption-column", default="title")
    parser.add_argument("--separator", default=None, help="one character, or 'tab'; default: tab for .tsv, comma")
    args = parser.parse_args(argv)
    separator = {"\\t": "\t", "tab": "\t"}.get(args.separator, args.separator)
    summary = write_shards(args.csv, args.out_dir, samples_per_shard=args.samples_per_shard,
                           image_column=args.image_column, caption_column=args.caption_column, separator=separator)
    last = len(summary.paths) - 1
    pattern = str(Path(args.out_dir) / f"{{00000..{last:05d}}}.tar") if last else str(summary.paths[0])
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(summary.skipped.items())) or "none"
    print(f"wrote {summary.samples} samples in {len(summary.paths)} shard(s) of up to {args.samples_per_shard} "
          f"in {args.out_dir}")
    print(f"skipped {sum(summary.skipped.values())} rows: {skipped}")
    print(f"train with: data.type = \"webdataset\", data.path = \"{pattern}\", data.num_samples = {summary.samples}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ClipforgeError as error:
        print(f"clipforge make-shards: error: {error}", file=sys.stderr)
        sys.exit(2)
