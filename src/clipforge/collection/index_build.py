"""``build_index``: an index folder from an embeddings folder or an image folder, written whole or not at all.

Everything is written into a hidden sibling ``.INDEX.tmp-XXXXXXXX`` and renamed over ``INDEX`` only
once it is complete (the old index is moved aside first and deleted after), so a crash or a full
disk leaves the previous index usable. Re-indexing an image folder reuses the vectors of files whose
path, size and mtime are unchanged, as long as the model (its spec, and the size and mtime of a local
checkpoint) and the precision are the same.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clipforge.collection.index import (
    EMBEDDINGS_DIR,
    INDEX_FORMAT,
    INDEX_VERSION,
    INFO_FILE,
    ITEM_COLUMNS,
    ITEMS_FILE,
    KINDS,
    VECTORS_FILE,
    Index,
    import_pyarrow,
    load_index,
    model_spec,
)
from clipforge.collection.sources import printable
from clipforge.errors import ClipforgeError, shorten

COPY_ROWS = 65536  # rows gathered at once when assembling vectors.npy
PART_ROWS = 10000  # rows per part of INDEX/embeddings (clipforge embed's default)
SKIPS_KEPT = 50  # skipped files named in index.json


def is_embeddings_folder(folder: Path) -> bool:
    """clip-retrieval layout (clipforge embed's output) rather than a folder of images."""
    return (folder / "img_emb").is_dir() or (folder / "embed_info.json").is_file()


def _check_paths(source: Path, target: Path) -> None:
    if not source.exists():
        raise ClipforgeError(f"source '{shorten(source)}' does not exist; pass an image folder or an embeddings "
                             "folder written by clipforge embed")
    if not source.is_dir():
        raise ClipforgeError(f"source '{shorten(source)}' is a file; pass an image folder or an embeddings folder "
                             "written by clipforge embed")
    src, dst = source.resolve(), target.resolve()
    if src == dst or dst in src.parents:
        raise ClipforgeError(f"index folder '{shorten(target)}' is the source '{shorten(source)}' or holds it, and "
                             "would be replaced; write the index to another folder")
    if target.is_file() or target.is_symlink() and not target.is_dir():
        raise ClipforgeError(f"index destination '{shorten(target)}' is a file; name a folder")
    if target.is_dir() and not (target / INFO_FILE).exists() and any(target.iterdir()):
        raise ClipforgeError(f"folder '{shorten(target)}' is not empty and is not a clipforge index, so it will not be "
                             "replaced; choose a new or empty folder")


def _model_stamp(spec: dict[str, Any] | None) -> dict[str, Any]:
    """Size and mtime of a local checkpoint (file or folder), so an overwritten checkpoint is noticed."""
    stamp: dict[str, Any] = {}
    for key in ("source", "model_config"):
        value = (spec or {}).get(key)
        if not isinstance(value, str) or not os.path.exists(value):
            continue
        path = Path(value)
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())[:1000]
        stamp[key] = [[str(f.relative_to(path)) if f != path else "", f.stat().st_size, f.stat().st_mtime_ns]
                      for f in files]
    return stamp


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "float32"


def _previous(target: Path, source: Path, spec: dict, dtype: str, incremental: bool,
              say: Callable[[str], None]) -> Index | None:
    """The existing index at target when its vectors can be reused for this source, model and precision."""
    if not incremental or not (target / INFO_FILE).exists():
        return None
    try:
        old = load_index(target)
    except ClipforgeError as error:
        say(f"the existing index cannot be reused ({error}); embedding everything")
        return None
    same = (old.info.get("source") == str(source) and old.info.get("model") == spec
            and old.info.get("dtype") == dtype and old.info.get("model_stamp") == _model_stamp(spec))
    if not same:
        say("the existing index was built from another folder, model or precision; embedding everything")
        return None
    return old


def _record(skip: Any) -> dict[str, Any]:
    if hasattr(skip, "_asdict"):
        skip = skip._asdict()
    if isinstance(skip, dict):
        return {key: value if isinstance(value, (str, int, float, type(None))) else str(value)
                for key, value in skip.items()}
    return {"detail": str(skip)}


def _from_images(source: Path, target: Path, spec: dict | None, *, incremental: bool, batch_size: int,
                 num_workers: int, device: Any, dtype: Any, say: Callable[[str], None],
                 log_progress: bool) -> dict[str, Any]:
    """Plan and run the embedding of an image folder: which rows come from the previous index, which are new."""
    from clipforge.collection.sources import ImageFolderSource

    if spec is None:
        raise ClipforgeError(f"'{shorten(source)}' is an image folder, so indexing it needs a model to embed the "
                             "images; pass --model (a checkpoint, a released name such as ViT-B-32, or ARCH/TAG)")
    paths = ImageFolderSource(source).paths
    names = [printable(path) for path in paths]  # as stored in items.parquet (valid UTF-8)
    stats: list[tuple[int, float] | None] = []
    for path in paths:
        try:
            info = os.stat(path)
            stats.append((int(info.st_size), float(info.st_mtime)))
        except OSError:
            stats.append(None)  # a dangling link: embedding skips it and names it
    old = _previous(target, source, spec, _dtype_name(dtype), incremental, say)
    reuse = np.full(len(paths), -1, np.int64)
    removed = 0
    if old is not None:
        columns = old.items.select(["image_path", "size", "mtime"]).to_pydict()
        known = {p: (row, s, m) for row, (p, s, m) in enumerate(zip(columns["image_path"], columns["size"],
                                                                    columns["mtime"]))}
        for i, (name, stat) in enumerate(zip(names, stats)):
            entry = known.get(name)
            if entry is not None and stat is not None and (entry[1], entry[2]) == stat:
                reuse[i] = entry[0]
        removed = len(known) - len(set(names) & known.keys())
    todo = np.flatnonzero(reuse < 0)
    say(f"{len(paths)} images in '{shorten(source)}': {len(paths) - todo.size} unchanged, {todo.size} to embed"
        + (f", {removed} gone since the last build" if old is not None else ""))
    embedded = np.zeros((0, old.embed_dim if old is not None else 0), np.float32)
    got = np.full(len(paths), -1, np.int64)
    skipped: list[dict[str, Any]] = []
    dim = old.embed_dim if old is not None else None
    if todo.size:
        from clipforge.collection.embed import embed_image_files
        from clipforge.collection.search import load_model

        model, preprocess = load_model(spec, device)
        if preprocess is None:
            raise ClipforgeError(f"model '{shorten(spec['source'])}' has no image tower, so it cannot index images; "
                                 "pass a CLIP model with one")
        kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        if "progress" in inspect.signature(embed_image_files).parameters:
            kwargs["progress"] = log_progress
        embedded, kept, skips = embed_image_files(model, preprocess, [paths[i] for i in todo],
                                                  batch_size=batch_size, num_workers=num_workers, **kwargs)
        embedded = np.asarray(embedded, dtype=np.float32)
        got[todo[np.asarray(kept, dtype=np.int64)]] = np.arange(len(kept))
        skipped = [_record(s) for s in skips]
        dim = int(model.config.embed_dim)
        if old is not None and dim != old.embed_dim:
            raise ClipforgeError(f"the model now gives {dim}-dimensional embeddings but the index holds "
                                 f"{old.embed_dim}; rebuild without incremental reuse")
    keep = np.flatnonzero((reuse >= 0) | (got >= 0))
    if keep.size == 0:
        raise ClipforgeError(f"none of the {len(paths)} images in '{shorten(source)}' could be read "
                             f"({len(skipped)} skipped); check the files")
    rows = [{"image_path": names[i], "caption": None, "size": stats[i][0] if stats[i] else None,  # type: ignore[index]
             "mtime": stats[i][1] if stats[i] else None} for i in keep]  # type: ignore[index]
    return {"old": old, "reuse": reuse[keep], "got": got[keep], "embedded": embedded, "rows": rows, "dim": dim,
            "stats": {"embedded": int((got >= 0).sum()), "reused": int((reuse >= 0).sum()), "removed": removed,
                      "skipped": len(skipped), "skipped_items": skipped[:SKIPS_KEPT]}}


def _write_vectors(path: Path, plan: dict[str, Any]) -> np.ndarray:
    """vectors.npy assembled from reused rows of the old index and new embeddings, chunk by chunk."""
    reuse, got, embedded, old = plan["reuse"], plan["got"], plan["embedded"], plan["old"]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(reuse), plan["dim"]))
    for start in range(0, len(reuse), COPY_ROWS):
        stop = min(start + COPY_ROWS, len(reuse))
        block = np.empty((stop - start, plan["dim"]), np.float16)
        from_old = reuse[start:stop] >= 0
        if from_old.any():
            block[from_old] = old.vectors[reuse[start:stop][from_old]]
        if (~from_old).any():
            block[~from_old] = embedded[got[start:stop][~from_old]].astype(np.float16)
        out[start:stop] = block
    out.flush()
    return out


def _write_embeddings(folder: Path, vectors: np.ndarray, items: Any, spec: dict, source: Path, plan: dict,
                      dtype: str) -> None:
    """The index's vectors again in clip-retrieval layout, so other tools (autofaiss, clip-retrieval) read them."""
    from clipforge import __version__
    from clipforge.collection.layout import EmbedInfo, write_part

    count = vectors.shape[0]
    parts = (count + PART_ROWS - 1) // PART_ROWS
    for n in range(parts):
        start, stop = n * PART_ROWS, min((n + 1) * PART_ROWS, count)
        write_part(folder, n, np.asarray(vectors[start:stop]), items.slice(start, stop - start), "img",
                   width=len(str(parts)))
    reasons: dict[str, int] = {}
    for item in plan["stats"]["skipped_items"]:
        reasons[str(item.get("reason", "skipped"))] = reasons.get(str(item.get("reason", "skipped")), 0) + 1
    EmbedInfo(model=spec["source"], pretrained=spec["pretrained"], model_config=spec["model_config"],
              quick_gelu=spec["quick_gelu"], image_size=spec["image_size"], embed_dim=vectors.shape[1],
              dtype="float16", part_size=PART_ROWS, kinds=["img"], source=str(source), source_type="folder",
              parts=parts, parts_done=parts, complete=True,
              counts={"items": count + plan["stats"]["skipped"], "img": count, "skipped": plan["stats"]["skipped"]},
              skipped=reasons,
              skipped_items=[{k: str(v) for k, v in s.items()} for s in plan["stats"]["skipped_items"]],
              precision={"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype),
              clipforge_version=__version__).write(folder)


def _items_table(rows_or_table: Any) -> Any:
    pa = import_pyarrow()
    schema = pa.schema([("image_path", pa.string()), ("caption", pa.string()), ("size", pa.int64()),
                        ("mtime", pa.float64())])
    if isinstance(rows_or_table, pa.Table):
        table = rows_or_table
        columns = [table.column(c).cast(schema.field(c).type) if c in table.column_names
                   else pa.nulls(table.num_rows, schema.field(c).type) for c in ITEM_COLUMNS]
        return pa.table(columns, schema=schema)
    return pa.table({c: [row.get(c) for row in rows_or_table] for c in ITEM_COLUMNS}, schema=schema)


def _fsync_tree(folder: Path) -> None:
    from clipforge.checkpoints.atomic import fsync_folder

    for parent, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(parent, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_folder(Path(parent))


def _swap_in(stage: Path, target: Path) -> None:
    """Rename the complete stage over target; the old index is moved aside first and removed last."""
    if not target.exists():
        os.rename(stage, target)
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.rename(target, aside / "index")
    try:
        os.rename(stage, target)
    except OSError:
        os.rename(aside / "index", target)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def build(source: Any, index_dir: Any, *, model: Any, pretrained: Any, quick_gelu: Any, model_config: Any,
          image_size: Any, kind: str, incremental: bool, batch_size: int, num_workers: int, device: Any,
          dtype: Any, nlist: int | None, pq_m: int | None, hnsw_m: int, seed: int, log: Any) -> Index:
    """See clipforge.collection.index.build_index."""
    from clipforge.checkpoints.atomic import TEMP_MARK, write_error

    started = time.time()
    say: Callable[[str], None] = log or (lambda message: None)
    if kind not in KINDS:
        raise ClipforgeError(f"index kind must be one of {', '.join(KINDS)}, got {str(kind)[:40]!r}")
    if batch_size < 1 or num_workers < 0:
        raise ClipforgeError(f"batch size must be at least 1 and workers at least 0, got {batch_size} and "
                             f"{num_workers}")
    source_path = Path(os.path.abspath(os.path.expanduser(os.fspath(source))))  # as ImageFolderSource spells paths
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(index_dir))))
    _check_paths(source_path, target)
    pa = import_pyarrow()
    if kind != "exact":
        from clipforge.collection.index_faiss import import_faiss

        import_faiss()  # fail before any embedding work
    spec = model_spec(model, pretrained, quick_gelu, model_config, image_size) if model is not None else None
    from_embeddings = is_embeddings_folder(source_path)
    if from_embeddings:
        vectors, items, spec = _read_embeddings_source(source_path, spec)
        plan = None
        say(f"{vectors.shape[0]} embeddings of {vectors.shape[1]} dimensions in '{shorten(source_path)}'")
    else:
        plan = _from_images(source_path, target, spec, incremental=incremental, batch_size=batch_size,
                            num_workers=num_workers, device=device, dtype=dtype, say=say, log_progress=log is not None)
        items = _items_table(plan["rows"])
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name[:200]}{TEMP_MARK}"))
    try:
        if plan is None:
            with open(stage / VECTORS_FILE, "wb") as f:
                np.save(f, vectors)
        else:
            vectors = _write_vectors(stage / VECTORS_FILE, plan)
            _write_embeddings(stage / EMBEDDINGS_DIR, vectors, items, spec, source_path, plan, _dtype_name(dtype))
        import pyarrow.parquet as pq

        pq.write_table(items, stage / ITEMS_FILE)
        faiss_params = None
        if kind != "exact":
            from clipforge.collection.index_faiss import FAISS_FILE, build_faiss, write_faiss

            say(f"building the {kind} index")
            index, faiss_params = build_faiss(vectors, kind, seed=seed, nlist=nlist, pq_m=pq_m, hnsw_m=hnsw_m)
            write_faiss(index, stage / FAISS_FILE)
        info = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "model": spec, "embed_dim": int(vectors.shape[1]),
                "count": int(vectors.shape[0]), "kind": kind, "faiss": faiss_params,
                "source": None if from_embeddings else str(source_path),
                "embeddings": str(source_path) if from_embeddings else str(target / EMBEDDINGS_DIR),
                "dtype": _dtype_name(dtype) if not from_embeddings else None, "model_stamp": _model_stamp(spec),
                "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "build_seconds": round(time.time() - started, 3),
                "build": plan["stats"] if plan is not None else {"embedded": 0, "reused": int(vectors.shape[0]),
                                                                  "removed": 0, "skipped": 0, "skipped_items": []}}
        (stage / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        del vectors  # close the memory map before the folder moves
        if plan is not None:
            plan["old"] = None
        _fsync_tree(stage)
        _swap_in(stage, target)
    except OSError as error:
        raise write_error(error, target, existed=(target / INFO_FILE).exists(), what="index files") from error
    except pa.ArrowException as error:
        raise write_error(error, target, existed=(target / INFO_FILE).exists(), what="index files") from error
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return load_index(target)


def _read_embeddings_source(folder: Path, spec: dict | None) -> tuple[np.ndarray, Any, dict | None]:
    """(float16 vectors, items table, model spec) of a clipforge embed output; the spec from embed_info.json
    unless a model was given."""
    from clipforge.collection.layout import INFO_NAME, EmbedInfo, read_embeddings

    vectors, table = read_embeddings(folder, "img", dtype=None)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ClipforgeError(f"embeddings folder '{shorten(folder)}' holds no image embeddings; run clipforge embed "
                             "on images into it")
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    if not np.isfinite(vectors).all():
        raise ClipforgeError(f"embeddings folder '{shorten(folder)}' holds NaN or infinite values; embed it again")
    if spec is None and (folder / INFO_NAME).is_file():
        info = EmbedInfo.read(folder)
        if info.model:
            spec = model_spec(info.model, info.pretrained, info.quick_gelu, info.model_config, info.image_size)
    return vectors, _items_table(table), spec
