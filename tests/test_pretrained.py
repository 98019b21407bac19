"""open_clip's pretrained tags as data (checked against open_clip itself) and their download.

Downloads run against local servers on 127.0.0.1: a plain HTTP server for URL sources and a
small fake Hugging Face Hub (HEAD + GET on /{repo}/resolve/{revision}/{file}) that the real
``huggingface_hub.hf_hub_download`` talks to, so nothing leaves the machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
from importlib import resources

import pytest

from clipforge.checkpoints import download, pretrained
from clipforge.checkpoints.pretrained import (PretrainedName, fetch_pretrained, get_pretrained, list_pretrained,
                                              list_pretrained_tags, split_pretrained_name)
from clipforge.cli.main import main
from clipforge.errors import DownloadError, UnknownModelError
from conftest import REPO_ROOT

open_clip_pretrained = pytest.importorskip("open_clip.pretrained")
_spec = importlib.util.spec_from_file_location("import_open_clip_pretrained",
                                               REPO_ROOT / "scripts" / "import_open_clip_pretrained.py")
importer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(importer)
PLAIN_CLIP = importer.PLAIN_CLIP
REGISTRY = open_clip_pretrained._PRETRAINED
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --- the data agrees with open_clip -------------------------------------------------------------

def test_json_is_what_the_import_script_writes():
    path = resources.files("clipforge.checkpoints") / "pretrained_tags.json"
    text = path.read_text(encoding="utf-8")
    assert text == importer.render(importer.build_records())  # up to date with the installed open_clip
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"  # deterministic form
    records = json.loads(text)["pretrained"]
    assert records == sorted(records, key=lambda r: (r["architecture"], r["tag"]))


@pytest.mark.parametrize("architecture", PLAIN_CLIP)
def test_every_plain_clip_record_matches_open_clip(architecture):
    expected = REGISTRY.get(architecture, {})
    assert sorted(list_pretrained_tags(architecture)) == sorted(expected)
    for tag, cfg in expected.items():
        ours = get_pretrained(architecture, tag)
        assert ours.url == (cfg["url"] or None)
        assert f"{ours.hf_hub_id}/{ours.hf_filename or ''}" == cfg["hf_hub"]  # 'org/repo/' or 'org/repo/file'
        assert ours.quick_gelu == cfg.get("quick_gelu", False)
        assert ours.mean == tuple(cfg["mean"]) and ours.std == tuple(cfg["std"])
        assert (ours.interpolation, ours.resize_mode) == (cfg["interpolation"], cfg["resize_mode"])
        assert ours.fill_color == cfg.get("fill_color") and ours.size == cfg.get("size")
        preprocess = ours.preprocess_cfg()
        assert {k: preprocess[k] for k in ("mean", "std", "interpolation", "resize_mode")} == \
               {k: tuple(cfg[k]) if k in ("mean", "std") else cfg[k]
                for k in ("mean", "std", "interpolation", "resize_mode")}


def test_registry_holds_only_plain_clip_and_openai_urls_come_from_released():
    names = list_pretrained()
    assert {n.architecture for n in names} <= set(PLAIN_CLIP)
    assert len(names) == sum(len(REGISTRY.get(a, {})) for a in PLAIN_CLIP) == 108
    for name in names:
        if name.tag == "openai":
            assert name.source == download.RELEASED[name.architecture.removesuffix("-quickgelu")]
        else:
            assert name.source == f"hf-hub:{get_pretrained(name.architecture, name.tag).hf_hub_id}"


def test_runtime_never_imports_open_clip():
    code = ("import sys, clipforge.checkpoints.pretrained as p; p.get_pretrained('ViT-B-32', 'openai'); "
            "sys.exit('open_clip' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode == 0


# --- names ---------------------------------------------------------------------------------------

def test_names_tags_and_spellings():
    weights = get_pretrained("ViT-B-32", "LAION2B-S34B-B79K")  # open_clip's tag cleaning
    assert (weights.tag, weights.hf_hub_id, weights.quick_gelu) == (
        "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", False)
    assert get_pretrained("ViT-L/14@336px", "openai").architecture == "ViT-L-14-336"
    assert get_pretrained("ViT-B/32", "openai").url == download.RELEASED["ViT-B-32"]
    metaclip = get_pretrained("ViT-L-14-quickgelu", "metaclip_fullcc")
    assert metaclip.quick_gelu and metaclip.base_architecture == "ViT-L-14"
    clipa = get_pretrained("ViT-H-14-CLIPA-336", "datacomp1b").preprocess_cfg()
    assert clipa == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear",
                     "resize_mode": "squash", "fill_color": 0}
    assert get_pretrained("ViT-H-14-378-quickgelu", "dfn5b").resize_mode == "squash"
    assert "metaclip2_worldwide" in list_pretrained_tags("ViT-bigG-14-worldwide")
    assert list_pretrained_tags("ViT-S-16") == [] and list_pretrained("no-such-model") == []
    assert list_pretrained("ViT-B/16") == [n for n in list_pretrained() if n.architecture == "ViT-B-16"]
    assert isinstance(list_pretrained()[0], PretrainedName)


@pytest.mark.parametrize("text, expected", [
    ("ViT-B-32/laion2b_s34b_b79k", ("ViT-B-32", "laion2b_s34b_b79k")),
    ("ViT-H-14/LAION2B-S32B-B79K", ("ViT-H-14", "laion2b_s32b_b79k")),
    ("ViT-L/14@336px/openai", ("ViT-L-14-336", "openai")),
    ("ViT-L-14-quickgelu/metaclip_fullcc", ("ViT-L-14-quickgelu", "metaclip_fullcc")),
    ("ViT-B/32", None),  # OpenAI's architecture name, not ARCH/TAG
    ("ViT-L/14", None),
    ("ViT-B-32", None),
    ("ViT-B-32/laion2b", None),  # not a known tag
    ("runs/exp1/ViT-B-32.pt", None),
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None),
    ("/openai", None),
])
def test_split_pretrained_name(text, expected):
    assert split_pretrained_name(text) == expected


def test_unknown_names_are_one_sentence_with_the_fix():
    with pytest.raises(UnknownModelError) as error:
        get_pretrained("ViT-B-33", "openai")
    message = str(error.value)
    assert "ViT-B-32" in message and "clipforge models --pretrained" in message and "\n" not in message
    with pytest.raises(UnknownModelError) as error:
        get_pretrained("ViT-H-14", "laion2b")
    message = str(error.value)
    assert "not a pretrained tag of ViT-H-14" in message and "laion2b_s32b_b79k" in message
    assert "dfn5b" in message and "path" in message and "\n" not in message


# --- URL downloads -------------------------------------------------------------------------------

class _Server:
    """Serves {path: bytes} on 127.0.0.1 and counts GETs; HEAD too, for the fake Hub."""

    def __init__(self, files: dict[str, bytes], hub: bool = False):
        self.files, self.gets, outer = files, [], self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _headers(self) -> bytes | None:
                body = outer.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_response(404)
                    if hub:  # what the Hub answers for a missing file in an existing repo
                        self.send_header("X-Error-Code", "EntryNotFound")
                        self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                if hub:
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.end_headers()
                return body

            def do_HEAD(self):  # noqa: N802 (http.server's naming)
                self._headers()

            def do_GET(self):  # noqa: N802
                outer.gets.append(self.path)
                body = self._headers()
                if body is not None:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []
    yield lambda files, hub=False: servers.append(_Server(files, hub)) or servers[-1]
    for s in servers:
        s.close()


DATA = b"not really a checkpoint, " * 400
SHA = hashlib.sha256(DATA).hexdigest()


def _url_weights(url: str, tag: str = "laion400m_e31") -> pretrained.PretrainedWeights:
    return dataclasses.replace(get_pretrained("ViT-B-32", tag), url=url, hf_hub_id=None)


def test_release_file_downloads_once_with_its_name_hash(server, tmp_path):
    name = f"vit_b_32-quickgelu-laion400m_e31-{SHA[:8]}.pt"
    srv = server({f"/v0.2-weights/{name}": DATA})
    weights = _url_weights(f"{srv.url}/v0.2-weights/{name}")
    assert pretrained.url_sha256(weights.url) == SHA[:8] and weights.source == weights.url
    path = fetch_pretrained(weights, tmp_path, progress=False)
    assert path == tmp_path / name and path.read_bytes() == DATA
    assert fetch_pretrained(weights, tmp_path, progress=False) == path and len(srv.gets) == 1  # cached
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no .part left


def test_corrupt_release_file_is_refused_and_removed(server, tmp_path):
    name = f"vit_b_32-quickgelu-laion400m_e31-{SHA[:8]}.pt"
    srv = server({f"/{name}": DATA[:-10] + bytes(10)})
    with pytest.raises(DownloadError, match=r"ViT-B-32/laion400m_e31 weights .*SHA-256.*starting with"):
        fetch_pretrained(_url_weights(f"{srv.url}/{name}"), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_url_without_hash_and_openai_urls(server, tmp_path, monkeypatch):
    srv = server({"/metaclip/b32_400m.pt": DATA, f"/{SHA}/ViT-B-32.pt": DATA, f"/{'0' * 64}/RN50.pt": DATA})
    weights = _url_weights(f"{srv.url}/metaclip/b32_400m.pt", "metaclip_400m")
    assert pretrained.url_sha256(weights.url) is None
    assert fetch_pretrained(weights, tmp_path, progress=False).read_bytes() == DATA
    calls = []
    monkeypatch.setattr(pretrained, "download_verified", lambda *a: calls.append(a) or download.download_verified(*a))
    openai = dataclasses.replace(get_pretrained("ViT-B-32", "openai"), url=f"{srv.url}/{SHA}/ViT-B-32.pt")
    assert openai.source == openai.url  # OpenAI's SHA-256 URL wins over the timm Hub copy
    assert fetch_pretrained(openai, tmp_path, progress=False).read_bytes() == DATA and len(calls) == 1
    wrong = dataclasses.replace(openai, url=f"{srv.url}/{'0' * 64}/RN50.pt")
    with pytest.raises(DownloadError, match="SHA-256"):
        fetch_pretrained(wrong, tmp_path, progress=False)
    assert not (tmp_path / "RN50.pt").exists()


def test_prefer_url_takes_the_url_over_the_hub(server, tmp_path):
    srv = server({"/b16_400m.pt": DATA})
    weights = dataclasses.replace(get_pretrained("ViT-B-16", "metaclip_400m"), url=f"{srv.url}/b16_400m.pt")
    assert weights.source.startswith("hf-hub:")
    assert fetch_pretrained(weights, tmp_path, progress=False, prefer_url=True).read_bytes() == DATA


def test_unreachable_url_is_one_sentence(tmp_path):
    weights = _url_weights("http://127.0.0.1:9/vit_b_32-quickgelu-laion400m_e31-d867053b.pt")  # nothing on port 9
    with pytest.raises(DownloadError) as error:
        fetch_pretrained(weights, tmp_path, progress=False)
    message = str(error.value)
    assert "ViT-B-32/laion400m_e31" in message and "http://127.0.0.1:9/" in message
    assert "check the network connection" in message and "local path" in message


# --- Hugging Face Hub downloads (real huggingface_hub against a local fake Hub) -------------------

@pytest.fixture
def hub(server, monkeypatch, tmp_path):
    """A fake Hub with one repo; huggingface_hub's endpoint points at it."""
    import huggingface_hub.constants as constants

    def start(files: dict[str, bytes]):
        repo = get_pretrained("ViT-B-32", "laion2b_s34b_b79k").hf_hub_id
        srv = server({f"/{repo}/resolve/main/{name}": body for name, body in files.items()}, hub=True)
        monkeypatch.setattr(constants, "ENDPOINT", srv.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", srv.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        return srv

    return start


def _files(srv: _Server) -> list[str]:
    """Files fetched from the fake Hub (huggingface_hub also asks /api/... once for its user agent)."""
    return [path.rsplit("/", 1)[1] for path in srv.gets if "/resolve/" in path]


def test_hub_prefers_safetensors_and_caches(hub, tmp_path, monkeypatch):
    srv = hub({"open_clip_model.safetensors": DATA, "open_clip_pytorch_model.bin": b"the .bin copy"})
    weights = get_pretrained("ViT-B-32", "laion2b_s34b_b79k")
    path = fetch_pretrained(weights, tmp_path / "hf")
    assert path.name == "open_clip_model.safetensors" and path.read_bytes() == DATA
    assert tmp_path / "hf" in path.parents
    assert fetch_pretrained(weights, tmp_path / "hf") == path
    assert _files(srv) == ["open_clip_model.safetensors"]  # one GET, never the .bin
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert fetch_pretrained(weights, tmp_path / "hf") == path  # offline, from the cache


def test_hub_falls_back_to_the_bin_file(hub, tmp_path):
    srv = hub({"open_clip_pytorch_model.bin": DATA})
    path = fetch_pretrained(get_pretrained("ViT-B-32", "laion2b_s34b_b79k"), tmp_path)
    assert path.name == "open_clip_pytorch_model.bin" and path.read_bytes() == DATA
    assert _files(srv) == ["open_clip_pytorch_model.bin"]
    assert pretrained._hub_candidates("pytorch_model.bin") == ["pytorch_model.safetensors", "pytorch_model.bin"]


def test_hub_repo_without_weights_files(hub, tmp_path):
    hub({"README.md": b"hello"})
    with pytest.raises(DownloadError, match="has none of the files open_clip_model.safetensors, "
                                            "open_clip_pytorch_model.bin"):
        fetch_pretrained(get_pretrained("ViT-B-32", "laion2b_s34b_b79k"), tmp_path)


def test_hub_offline_is_one_sentence(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError) as error:
        fetch_pretrained(get_pretrained("ViT-H-14", "laion2b_s32b_b79k"), tmp_path)
    message = str(error.value)
    assert "ViT-H-14/laion2b_s32b_b79k" in message and "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in message
    assert "check the network connection" in message and "local path" in message and "\n" not in message


# --- CLI -----------------------------------------------------------------------------------------

def test_cli_models_pretrained_table(capsys):
    assert main(["models", "--pretrained"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["architecture", "tag", "source", "quick_gelu"]
    assert "108 pretrained weights for 38 architectures" in out
    row = next(line for line in out.splitlines() if "laion2b_s34b_b79k" in line and line.startswith("ViT-B-32 "))
    assert row.split() == ["ViT-B-32", "laion2b_s34b_b79k", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "no"]
    assert download.RELEASED["RN50"] in out


def test_cli_models_pretrained_for_one_architecture(capsys):
    assert main(["models", "--pretrained", "ViT-L/14@336px"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:-2]
    assert [row.split()[:2] for row in rows] == [["ViT-L-14-336", "openai"]] and rows[0].split()[3] == "yes"
    assert main(["models", "--pretrained", "ViT-B-33"]) == 2
    assert "close names with weights are ViT-B-32" in capsys.readouterr().err


def test_cli_plain_models_keeps_its_table():
    """The architectures table itself is covered in test_cli.py; here only that it is still the default."""
    from clipforge.cli.main import build_parser
    from clipforge.cli.models_command import run_models_command

    args = build_parser().parse_args(["models"])
    assert args.run is run_models_command and args.pretrained is None
    assert build_parser().parse_args(["models", "--pretrained"]).pretrained == ""
