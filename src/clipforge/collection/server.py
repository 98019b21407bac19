"""``clipforge serve``'s web app: a JSON API and a small page over one index.

Files are served only by integer id, looked up in the index's own table, never by a path taken from the
request, so no URL can reach a file the index does not list. The query model loads once, in ``create_app``,
so a bad index fails before the server binds; queries run in a small thread pool so the event loop (and
thumbnails) keep moving while the model works.
"""

import asyncio
import contextlib
import functools
import io
import json
import math
import mimetypes
import os
import re
import stat
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from clipforge.errors import ClipforgeError

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

MAX_K = 200
MAX_OFFSET = 10_000  # each page is a top-(offset+k) search; nobody pages deeper by hand
MAX_TEXT_CHARS = 1_000
MAX_JSON_BYTES = 1 << 20  # an embedding of 4096 floats is ~80 KB
MULTIPART_SLACK = 64 << 10  # boundaries and small fields around the uploaded file
STATIC_TYPES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
QUERY_FIELDS = ("text", "embedding", "like")
CSP = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


class ApiError(Exception):
    """A refused request: an HTTP status and one sentence, sent as ``{"error": sentence}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def require_web_stack() -> None:
    """FastAPI, uvicorn and python-multipart are the optional ``search`` extra; say how to get them."""
    import importlib.util

    missing = [name for name, module in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                         ("python-multipart", "python_multipart"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ClipforgeError(f"clipforge serve needs {', '.join(missing)}, which is not installed; install it with "
                             "pip install 'clipforge[search]'")


def _shown(value: Any, longest: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= longest else text[:longest - 3] + "..."


def parse_int(value: Any, name: str, low: int, high: int) -> int:
    """A whole number in [low, high] from JSON or a query string; bools, 1.5 and '1e9' are refused."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,12}\s*", value):
        number = int(value)
    if number is None or not low <= number <= high:
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}, got {_shown(value)}")
    return number


@functools.lru_cache(maxsize=2048)  # ~20 KB each; the key holds mtime and size, so an edited file is redone
def make_thumbnail(path: str, mtime_ns: int, file_size: int, size: int) -> bytes:
    """A JPEG at most ``size`` pixels a side, upright (EXIF), transparency flattened onto white."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # a JPEG decodes at a reduced scale: much faster for big photos
        image = ImageOps.exif_transpose(image)
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        if image.mode in ("RGBA", "LA", "P", "PA"):
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, "white")
            image.paste(rgba, mask=rgba.getchannel("A"))
        out = io.BytesIO()
        image.convert("RGB" if image.mode != "L" else "L").save(out, "JPEG", quality=85)
    return out.getvalue()


def decode_upload(data: bytes) -> Any:
    """An uploaded file as an RGB PIL image, or an ApiError saying what is wrong with it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ApiError(400, "the uploaded file is empty; choose an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError:
        raise ApiError(415, "the uploaded file is not an image Pillow can read; upload a JPEG, PNG, WebP, GIF "
                            "or BMP file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "the uploaded image has too many pixels to decode safely; upload a smaller one") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise ApiError(400, f"the uploaded image is damaged or truncated ({_shown(str(error), 80)}); upload an "
                            "intact file") from None


async def read_limited(request: "Request", limit: int, what: str) -> bytes:
    """The request body, refused with 413 once the declared or the streamed size passes ``limit``."""
    too_big = ApiError(413, f"{what} is larger than the {limit / (1 << 20):.3g} MiB this server accepts")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class Service:
    """The opened index and its query model, and the lookups the routes share."""

    def __init__(self, index_dir: str, device: str | None, workers: int) -> None:
        from clipforge.collection import search
        from clipforge.collection.index import load_index

        self.search = search
        self.index = load_index(index_dir)
        self.count, self.embed_dim = len(self.index), self.index.embed_dim
        spec = self.index.model_spec  # None: built from embeddings alone, so only embedding and like queries
        self.model = search.load_query_model(self.index, device) if spec else None
        name = str(spec["source"]) if spec else None
        if name and os.path.exists(name):
            name = os.path.basename(name.rstrip("/\\"))
        self.model_name = f"{name}/{spec['pretrained']}" if spec and spec.get("pretrained") else name
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipforge-query")

    def item_id(self, text: str) -> int:
        if not re.fullmatch(r"\d{1,12}", text) or int(text) >= self.count:
            raise ApiError(404, f"no item {_shown(text)} in this index; ids are whole numbers from 0 to "
                                f"{self.count - 1}")
        return int(text)

    def row(self, item_id: int) -> dict[str, Any]:
        return self.index.items.slice(item_id, 1).to_pylist()[0]

    def item_json(self, item_id: int, path: str | None, caption: str | None) -> dict[str, Any]:
        links = {"image": f"/image/{item_id}", "thumb": f"/thumb/{item_id}"} if path else {"image": None, "thumb": None}
        return {"id": item_id, "path": path, "caption": caption, **links}

    def file_of(self, item_id: int) -> tuple[str, os.stat_result]:
        """The indexed file and its stat now; 404 when it has gone since the index was built."""
        path = self.row(item_id).get("image_path")
        if not path:
            raise ApiError(404, f"item {item_id} is a text without an image file")
        try:
            info = os.stat(path)
        except (OSError, ValueError):
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            raise ApiError(404, f"item {item_id}'s file is no longer on disk (deleted or moved since the index was "
                                "built); rebuild the index")
        return path, info

    def run_query(self, kind: str, value: Any, wanted: int) -> list[Any]:
        """The top ``wanted`` results of one query (called in the thread pool)."""
        search, index = self.search, self.index
        try:
            if kind == "like":
                return search.more_like_this(index, value, wanted)
            if kind == "embedding":
                return search.search_embedding(index, value, wanted)
            if self.model is None:
                raise ApiError(400, "this index records no model, so it answers only embedding and like queries; "
                                    "rebuild it with a model to search by text or image")
            find = search.search_text if kind == "text" else search.search_image
            return find(index, value, wanted, model=self.model)
        except ClipforgeError as error:
            raise ApiError(400, str(error)) from None

    async def query(self, kind: str, value: Any, k: int, offset: int) -> dict[str, Any]:
        """One page of results; one more is fetched so the page knows whether a next page exists."""
        wanted = min(offset + k + 1, self.count)
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self.executor, self.run_query, kind, value, wanted) if wanted else []
        page = [{**self.item_json(r.id, r.path, r.caption), "score": round(float(r.score), 6)}
                for r in found[offset:offset + k]]
        return {"results": page, "k": k, "offset": offset, "more": len(found) > offset + k, "count": self.count}

    def check_query(self, fields: dict[str, Any]) -> tuple[str, Any, int, int]:
        """(kind, value, k, offset) from a JSON body or a query string, or one sentence on what is wrong."""
        unknown = sorted(set(fields) - {*QUERY_FIELDS, "k", "offset"})
        if unknown:
            raise ApiError(400, f"unknown field {_shown(unknown[0])}; send one of text, embedding or like, with "
                                "optional k and offset")
        given = [name for name in QUERY_FIELDS if fields.get(name) is not None]
        if len(given) != 1:
            raise ApiError(400, "send exactly one of text, embedding or like" +
                           (f", not {' and '.join(given)}" if given else ""))
        kind, value = given[0], fields[given[0]]
        k = parse_int(fields.get("k", 20), "k", 1, MAX_K)
        offset = parse_int(fields.get("offset", 0), "offset", 0, MAX_OFFSET)
        if kind == "text":
            if not isinstance(value, str) or not value.strip():
                raise ApiError(400, "text is empty; type some words to search for")
            if len(value) > MAX_TEXT_CHARS:
                raise ApiError(400, f"text is {len(value)} characters; keep it under {MAX_TEXT_CHARS}")
            value = value.strip()
        elif kind == "like":
            value = parse_int(value, "like", 0, self.count - 1)
        else:
            value = self.check_embedding(value)
        return kind, value, k, offset

    def check_embedding(self, value: Any) -> Any:
        import numpy as np

        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise ApiError(400, "embedding must be a JSON list of numbers, sent with POST")
        if len(value) != self.embed_dim:
            raise ApiError(400, f"embedding has {len(value)} numbers but this index's model makes {self.embed_dim}")
        if not all(math.isfinite(v) for v in value) or not any(value):
            raise ApiError(400, "embedding must be finite numbers, not all zero")
        return np.asarray(value, dtype=np.float32)


def create_app(index_dir: str | os.PathLike, *, max_upload_bytes: int = 10 << 20, thumbnail_size: int = 256,
               device: str | None = None, workers: int = 2, allowed_hosts: list[str] | None = None) -> "FastAPI":
    """The app for one index; opens the index and loads its query model now. ``allowed_hosts`` (names the Host
    header may carry) keeps other web sites from reading a localhost server through DNS rebinding."""
    require_web_stack()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    service = Service(os.fspath(index_dir), device, workers)
    folder = resources.files("clipforge.collection") / "static"
    static = {name: (folder / name).read_bytes() for name in STATIC_TYPES}  # served from memory, never by path
    etags = {name: f'"s{zlib.crc32(data):08x}"' for name, data in static.items()}
    hosts = {host.lower() for host in allowed_hosts} if allowed_hosts is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="clipforge search", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    app.add_exception_handler(ApiError, lambda _, e: error(e.status, e.message))
    app.add_exception_handler(HTTPException, lambda _, e: error(e.status_code, "no such page; the search page is / "
                              "and the API is under /api/" if e.status_code == 404 else str(e.detail)))
    app.add_exception_handler(RequestValidationError, lambda _, e: error(400, "the request is not valid"))

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Response:
        host = re.sub(r":\d+$", "", request.headers.get("host", "")).lower()
        if hosts is not None and host not in hosts:
            return error(400, f"host {_shown(host)} is not this server's name; open it by its own address")
        response = await call_next(request)
        for name, value in (("X-Content-Type-Options", "nosniff"), ("Content-Security-Policy", CSP),
                            ("Referrer-Policy", "no-referrer")):
            response.headers.setdefault(name, value)
        return response

    def cached(request: Request, body: bytes, media_type: str, etag: str, max_age: int) -> Response:
        headers = {"ETag": etag, "Cache-Control": f"private, max-age={max_age}"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    @app.get("/")
    async def page(request: Request) -> Response:
        return cached(request, static["index.html"], STATIC_TYPES["index.html"], etags["index.html"], 0)

    @app.get("/static/{name}")
    async def static_file(name: str, request: Request) -> Response:
        if name not in static:
            raise ApiError(404, f"no static file {_shown(name)}")
        return cached(request, static[name], STATIC_TYPES[name], etags[name], 0)

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "count": service.count, "model": service.model_name, "embed_dim": service.embed_dim}

    @app.get("/api/search")
    async def search_get(request: Request) -> dict[str, Any]:
        return await service.query(*service.check_query(dict(request.query_params)))

    @app.post("/api/search")
    async def search_post(request: Request) -> dict[str, Any]:
        body = await read_limited(request, MAX_JSON_BYTES, "the JSON body")
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, 'the body is not valid JSON; send e.g. {"text": "a dog", "k": 20}') from None
        if not isinstance(fields, dict):
            raise ApiError(400, 'the JSON body must be an object such as {"text": "a dog"}')
        return await service.query(*service.check_query(fields))

    @app.post("/api/search/image")
    async def search_image(request: Request) -> dict[str, Any]:
        """A multipart upload (field ``image``, optional ``k``/``offset``) or a raw image body."""
        from starlette.requests import Request as RawRequest

        body = await read_limited(request, max_upload_bytes + MULTIPART_SLACK, "the upload")
        content_type = request.headers.get("content-type", "")
        fields: dict[str, Any] = dict(request.query_params)
        if content_type.startswith("multipart/form-data"):
            async def replay() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await RawRequest(request.scope, replay).form(max_files=1, max_fields=8)
            except Exception as problem:  # python-multipart's parse errors and starlette's limits
                raise ApiError(400, f"the upload is not valid multipart form data ({_shown(str(problem), 80)})") \
                    from None
            upload = form.get("image") or form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "send the image as a multipart file field named image")
            data = await upload.read()
            fields.update({key: form[key] for key in ("k", "offset") if isinstance(form.get(key), str)})
        elif content_type.startswith(("image/", "application/octet-stream")):
            data = body
        else:
            raise ApiError(415, "send the image as multipart/form-data (field image) or as the raw request body")
        if len(data) > max_upload_bytes:
            raise ApiError(413, f"the upload is larger than the {max_upload_bytes / (1 << 20):.3g} MiB this server "
                                "accepts")
        k = parse_int(fields.get("k", 20), "k", 1, MAX_K)
        offset = parse_int(fields.get("offset", 0), "offset", 0, MAX_OFFSET)
        image = await run_in_threadpool(decode_upload, data)
        return await service.query("image", image, k, offset)

    @app.get("/api/item/{item_id}")
    async def item(item_id: str) -> dict[str, Any]:
        number = service.item_id(item_id)
        row = service.row(number)
        try:
            exists = bool(service.file_of(number))
        except ApiError:
            exists = False
        return {**service.item_json(number, row.get("image_path"), row.get("caption")),
                "size": row.get("size"), "mtime": row.get("mtime"), "exists": exists}

    @app.get("/image/{item_id}")
    async def image(item_id: str, request: Request) -> Response:
        number = service.item_id(item_id)
        path, info = service.file_of(number)
        etag = f'"i{number}-{info.st_mtime_ns:x}-{info.st_size:x}"'
        if request.headers.get("if-none-match") == etag:
            return cached(request, b"", "", etag, 3600)
        guessed = mimetypes.guess_type(path)[0] or ""
        try:
            body = await run_in_threadpool(Path(path).read_bytes)
        except OSError:
            raise ApiError(404, f"item {number}'s file can no longer be read; rebuild the index") from None
        return cached(request, body, guessed if guessed.startswith("image/") else "application/octet-stream",
                      etag, 3600)

    @app.get("/thumb/{item_id}")
    async def thumb(item_id: str, request: Request) -> Response:
        number = service.item_id(item_id)
        path, info = service.file_of(number)
        etag = f'"t{number}-{thumbnail_size}-{info.st_mtime_ns:x}-{info.st_size:x}"'
        if request.headers.get("if-none-match") == etag:
            return cached(request, b"", "", etag, 3600)
        try:
            data = await run_in_threadpool(make_thumbnail, path, info.st_mtime_ns, info.st_size, thumbnail_size)
        except Exception:  # Pillow raises many types for a file that is no longer an image
            raise ApiError(404, f"item {number}'s file can no longer be read as an image; rebuild the index") from None
        return cached(request, data, "image/jpeg", etag, 3600)

    return app
