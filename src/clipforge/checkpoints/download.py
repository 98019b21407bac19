"""OpenAI's released weights: the nine URLs, a local cache, and SHA-256 verification.

Each URL carries the file's SHA-256 as its second-to-last path segment (OpenAI's scheme).
A cached file is re-checked before use; a download is streamed to a ``.part`` file, hashed
on the way, and only moved into place when the hash matches, so a failed or corrupted
download never leaves a file that looks complete. ``download_checked`` does the same for URLs
whose hash is known only in part (open_clip's release files name a prefix) or not at all.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from clipforge.errors import DownloadError

_BASE = "https://openaipublic.azureedge.net/clip/models"
RELEASED = {
    "RN50": f"{_BASE}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": f"{_BASE}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": f"{_BASE}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": f"{_BASE}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": f"{_BASE}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B-32": f"{_BASE}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B-16": f"{_BASE}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L-14": f"{_BASE}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L-14-336": f"{_BASE}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """$CLIPFORGE_CACHE, else $XDG_CACHE_HOME/clipforge, else ~/.cache/clipforge."""
    if os.environ.get("CLIPFORGE_CACHE"):
        return Path(os.environ["CLIPFORGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipforge"


def expected_sha256(url: str) -> str:
    digest = url.rstrip("/").split("/")[-2]
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise DownloadError(f"URL '{url}' does not carry a SHA-256 in OpenAI's scheme (.../<sha256>/<file>)")
    return digest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_verified(url: str, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Path of the verified local copy of url, downloading it once if needed."""
    return download_checked(url, expected_sha256(url), cache_dir, progress)


def download_checked(url: str, sha256: str | None, cache_dir: str | Path | None = None, progress: bool = True,
                     what: str | None = None) -> Path:
    """Local copy of url in the cache, checked against sha256 (a full digest or a prefix; None: unchecked).

    open_clip's release files carry only a digest prefix in their names, and some hosts none at all,
    so the check is as strong as the source allows. ``what`` names the file in error messages.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / url.rstrip("/").split("/")[-1]
    if target.is_file() and (sha256 is None or sha256_of(target).startswith(sha256)):
        return target
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                      disable=not progress) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", error)
        source = f"{what} from {url}" if what else url
        raise DownloadError(
            f"cannot download {source} ({reason}); check the network connection, or download the file "
            "elsewhere and pass its local path instead"
        ) from None
    if sha256 is not None and not digest.hexdigest().startswith(sha256):
        partial.unlink(missing_ok=True)
        name = f"{what} ({target.name})" if what else target.name
        wanted = sha256 if len(sha256) == 64 else f"one starting with {sha256}"
        raise DownloadError(
            f"downloaded {name} has SHA-256 {digest.hexdigest()} but {wanted} was expected; "
            "the download is corrupt and was deleted, try again"
        )
    os.replace(partial, target)
    return target
