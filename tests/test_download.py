"""Released names download once from a URL carrying the SHA-256, tested against a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.checkpoints import api, download
from clipforge.errors import DownloadError, UnknownModelError
from clipforge.models.config import config_from_dict
from conftest import TINY_VIT, images_for, randomize_


class _Server:
    """Serves bytes from a dict {path: bytes} on 127.0.0.1 and counts requests."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                outer.requests += 1
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def archive(tmp_path) -> tuple[bytes, clipforge.CLIP]:
    model = randomize_(clipforge.create_model(config_from_dict(TINY_VIT))).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    return (tmp_path / "weights.pt").read_bytes(), model


@pytest.fixture
def server():
    servers = []
    yield lambda files: servers.append(_Server(files)) or servers[-1]
    for s in servers:
        s.close()


def test_released_name_downloads_once_and_verifies(archive, server, tmp_path, monkeypatch):
    data, model = archive
    sha = hashlib.sha256(data).hexdigest()
    srv = server({f"/{sha}/ViT-B-32.pt": data})
    monkeypatch.setitem(download.RELEASED, "ViT-B-32", f"{srv.url}/{sha}/ViT-B-32.pt")
    cache = tmp_path / "cache"
    loaded, preprocess = clipforge.load("ViT-B/32", cache_dir=cache)  # OpenAI's spelling works too
    assert (cache / "ViT-B-32.pt").read_bytes() == data and srv.requests == 1
    images, text = images_for(32), clipforge.tokenize(["a dog"])
    with torch.no_grad():
        assert torch.equal(loaded(images, text)[0], model(images, text)[0])
    clipforge.load("ViT-B-32", cache_dir=cache)
    assert srv.requests == 1  # served from the cache the second time


def test_corrupt_download_is_refused_and_removed(archive, server, tmp_path, monkeypatch):
    data, _ = archive
    sha = hashlib.sha256(data).hexdigest()
    corrupted = data[:-100] + bytes(100)
    srv = server({f"/{sha}/RN50.pt": corrupted})
    monkeypatch.setitem(download.RELEASED, "RN50", f"{srv.url}/{sha}/RN50.pt")
    with pytest.raises(DownloadError, match="SHA-256"):
        clipforge.load("RN50", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written or unverified is left behind


def test_cached_file_with_wrong_hash_is_downloaded_again(archive, server, tmp_path, monkeypatch):
    data, _ = archive
    sha = hashlib.sha256(data).hexdigest()
    srv = server({f"/{sha}/RN50.pt": data})
    (tmp_path / "RN50.pt").write_bytes(b"stale")
    path = download.download_verified(f"{srv.url}/{sha}/RN50.pt", tmp_path, progress=False)
    assert path.read_bytes() == data and srv.requests == 1


def test_no_network_is_one_clear_sentence(tmp_path, monkeypatch):
    sha = "0" * 64
    monkeypatch.setitem(download.RELEASED, "RN50", f"http://127.0.0.1:9/{sha}/RN50.pt")  # port 9: nothing listens
    with pytest.raises(DownloadError, match="check the network connection"):
        clipforge.load("RN50", cache_dir=tmp_path)


def test_url_without_sha_is_rejected():
    with pytest.raises(DownloadError, match="SHA-256"):
        download.expected_sha256("https://example.invalid/models/RN50.pt")


def test_default_cache_respects_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "c"))
    assert download.default_cache_dir() == tmp_path / "c"


def test_unknown_name_lists_released_models(tmp_path):
    with pytest.raises(UnknownModelError, match="ViT-L-14-336"):
        clipforge.load("ViT-Q-99", cache_dir=tmp_path)
    with pytest.raises(UnknownModelError, match=r"pretrained=TAG\).*laion2b_s32b_b79k"):  # names its tags
        clipforge.load("ViT-H-14", cache_dir=tmp_path)
    with pytest.raises(UnknownModelError, match="create_model"):
        clipforge.load("ViT-Tiny-32")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """huggingface_hub's two download calls, served from local folders named like repos."""
    import shutil

    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    repos, snapshots, fetched = tmp_path / "remote", tmp_path / "snapshots", []

    def snapshot_download(repo_id, cache_dir=None, allow_patterns=()):
        target = snapshots / repo_id
        target.mkdir(parents=True, exist_ok=True)
        for file in (repos / repo_id).iterdir():
            if any(file.match(pattern) for pattern in allow_patterns):
                shutil.copy(file, target / file.name)
        return str(target)

    def hf_hub_download(repo_id, filename, cache_dir=None):
        source = repos / repo_id / filename
        if not source.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        fetched.append(filename)
        return str(shutil.copy(source, snapshots / repo_id / filename))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return repos, fetched


@pytest.mark.parametrize("format, weights", [("hf", "model.safetensors"),
                                             ("open_clip", "open_clip_model.safetensors")])
def test_hf_hub_source_fetches_config_then_one_weights_file(fake_hub, format, weights):
    repos, fetched = fake_hub
    model = randomize_(clipforge.create_model(config_from_dict(TINY_VIT))).eval()
    folder = clipforge.save(model, repos / "someone" / "tiny-clip", format=format)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")  # a second copy must not be fetched
    loaded, _ = clipforge.load("hf-hub:someone/tiny-clip")
    assert fetched == [weights]
    images, text = images_for(32), clipforge.tokenize(["a dog"])
    with torch.no_grad():
        assert torch.equal(loaded(images, text)[0], model(images, text)[0])


def test_hf_hub_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="hf-hub:|Hugging Face Hub"):
        clipforge.load("hf-hub:nobody/not-cached", cache_dir=tmp_path)


def test_released_list_matches_architectures():
    assert set(api.released_models()) <= set(clipforge.available_models())
    assert len(api.released_models()) == 9
    assert all(Path(url).name.endswith(".pt") for url in download.RELEASED.values())
