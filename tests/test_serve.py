"""``clipforge serve``: the JSON API equals the search functions, bad requests get one sentence, no URL reaches
a file outside the index, and the page works in a real browser (Debian's chromium, headless)."""

from __future__ import annotations

import http.client
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="clipforge serve needs the search extra: pip install 'clipforge[search]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from conftest import REPO_ROOT, TINY_VIT, randomize_  # noqa: E402

COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SECRET = "clipforge-secret-4f7a2c"  # content of a file beside the collection, which must never be served
SERVER_SOURCE_MARK = "Files are served only by integer id"  # a line of server.py
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def draw(shape: str, color: tuple[int, int, int], size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    pen = ImageDraw.Draw(image)
    box = (16, 16, size - 16, size - 16)
    if shape == "circle":
        pen.ellipse(box, fill=color)
    elif shape == "square":
        pen.rectangle(box, fill=color)
    else:
        pen.polygon([(size // 2, 12), (size - 12, size - 14), (12, size - 14)], fill=color)
    return image


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny random model, 12 shape images with caption files, and the index built on them."""
    import clipforge
    from clipforge.collection.index import build_index

    root = tmp_path_factory.mktemp("serve")
    folder = root / "photos"
    folder.mkdir()
    for number, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        name = f"{number:02d}_{color}_{shape}"
        draw(shape, COLORS[color]).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {color} {shape}", encoding="utf-8")
    (root / "secret.txt").write_text(SECRET, encoding="utf-8")
    model_path = root / "tiny.safetensors"
    clipforge.save(randomize_(clipforge.create_model(TINY_VIT)).eval(), model_path)
    build_index(str(folder), str(root / "index"), model=str(model_path))
    return {"root": root, "folder": folder, "index_dir": root / "index", "model": model_path}


@pytest.fixture(scope="module")
def index(collection: dict):
    from clipforge.collection.index import load_index

    return load_index(collection["index_dir"])


@pytest.fixture(scope="module")
def client(collection: dict) -> TestClient:
    from clipforge.collection.server import create_app

    return TestClient(create_app(collection["index_dir"], max_upload_bytes=100_000, thumbnail_size=64))


def ids_scores(results) -> tuple[list[int], list[float]]:
    return [int(r.id) for r in results], [float(r.score) for r in results]


def check_same(response, expected) -> None:
    assert response.status_code == 200, response.text
    got = response.json()["results"]
    ids, scores = ids_scores(expected)
    assert [r["id"] for r in got] == ids
    np.testing.assert_allclose([r["score"] for r in got], scores, atol=1e-5)
    assert [r["path"] for r in got] == [str(r.path) for r in expected]


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_health(client: TestClient, index) -> None:
    body = client.get("/api/health").json()
    assert body["status"] == "ok" and body["count"] == len(index) == 12
    assert body["embed_dim"] == TINY_VIT["embed_dim"] and isinstance(body["model"], str) and body["model"]


def test_text_search_equals_search_text(client: TestClient, index) -> None:
    from clipforge.collection.search import search_text

    expected = search_text(index, ["a red circle"], 5)[0]
    check_same(client.post("/api/search", json={"text": "a red circle", "k": 5}), expected)
    check_same(client.get("/api/search", params={"text": "a red circle", "k": "5"}), expected)


def test_image_upload_equals_search_image(client: TestClient, index, collection: dict) -> None:
    from clipforge.collection.search import search_image

    image = Image.open(collection["folder"] / "04_green_square.png").convert("RGB")
    expected = search_image(index, [image], 6)[0]
    files = {"image": ("query.png", png_bytes(image), "image/png")}
    check_same(client.post("/api/search/image", files=files, data={"k": "6"}), expected)
    check_same(client.post("/api/search/image?k=6", content=png_bytes(image),
                           headers={"Content-Type": "image/png"}), expected)


def test_embedding_and_like(client: TestClient, index) -> None:
    from clipforge.collection.search import more_like_this, search_embedding

    vector = np.random.default_rng(0).standard_normal((1, TINY_VIT["embed_dim"])).astype(np.float32)
    check_same(client.post("/api/search", json={"embedding": vector[0].tolist(), "k": 7}),
               search_embedding(index, vector, 7)[0])
    check_same(client.post("/api/search", json={"like": 3, "k": 4}), more_like_this(index, 3, 4))
    check_same(client.get("/api/search?like=3&k=4"), more_like_this(index, 3, 4))


def test_paging_is_consistent(client: TestClient) -> None:
    whole = client.post("/api/search", json={"text": "a blue triangle", "k": 12}).json()
    pages = [client.post("/api/search", json={"text": "a blue triangle", "k": 5, "offset": o}).json()
             for o in (0, 5, 10)]
    assert [r["id"] for p in pages for r in p["results"]] == [r["id"] for r in whole["results"]]
    assert [p["more"] for p in pages] == [True, True, False] and not whole["more"]
    past = client.get("/api/search?text=x&offset=50").json()
    assert past["results"] == [] and past["more"] is False


def test_item_image_and_thumbnail(client: TestClient, collection: dict) -> None:
    item = client.get("/api/item/4").json()
    assert item["path"].endswith("04_green_square.png") and "caption" in item and item["size"] > 0
    assert item["exists"] is True and item["thumb"] == "/thumb/4"
    original = client.get("/image/4")
    assert original.status_code == 200 and original.headers["content-type"] == "image/png"
    assert original.content == (collection["folder"] / "04_green_square.png").read_bytes()
    thumb = client.get("/thumb/4")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 64
    assert "max-age" in thumb.headers["cache-control"] and thumb.headers["etag"]
    again = client.get("/thumb/4", headers={"If-None-Match": thumb.headers["etag"]})
    assert again.status_code == 304 and not again.content
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")


TRUNCATED_PNG = png_bytes(draw("circle", COLORS["red"], 300))[:1500]


@pytest.mark.parametrize("method, url, kwargs, status", [
    ("post", "/api/search", {"json": {"text": "   "}}, 400),
    ("get", "/api/search?text=", {}, 400),
    ("post", "/api/search", {"json": {"text": "dog", "k": 0}}, 400),
    ("post", "/api/search", {"json": {"text": "dog", "k": 10000}}, 400),
    ("get", "/api/search?text=dog&k=1.5", {}, 400),
    ("post", "/api/search", {"json": {"text": "dog", "offset": -1}}, 400),
    ("post", "/api/search", {"json": {"text": "dog", "like": 2}}, 400),
    ("post", "/api/search", {"json": {"txt": "dog"}}, 400),
    ("post", "/api/search", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
    ("post", "/api/search", {"json": ["text"]}, 400),
    ("post", "/api/search", {"json": {"embedding": [0.1] * 47}}, 400),
    ("post", "/api/search", {"json": {"embedding": ["a"] * 48}}, 400),
    ("post", "/api/search", {"json": {"like": 12}}, 400),
    ("post", "/api/search/image", {"files": {"image": ("notes.txt", b"just some text", "text/plain")}}, 415),
    ("post", "/api/search/image", {"files": {"image": ("cut.png", TRUNCATED_PNG, "image/png")}}, 400),
    ("post", "/api/search/image", {"files": {"image": ("big.png", b"\0" * 150_000, "image/png")}}, 413),
    ("post", "/api/search/image", {"files": {"other": ("a.png", b"x", "image/png")}}, 400),
    ("post", "/api/search/image", {"content": b"k=1", "headers": {"Content-Type": "text/plain"}}, 415),
    ("get", "/api/item/12", {}, 404),
    ("get", "/api/item/-1", {}, 404),
    ("get", "/thumb/1e9", {}, 404),
    ("get", "/api/nothing", {}, 404),
])
def test_bad_requests_get_one_sentence(client: TestClient, method: str, url: str, kwargs: dict, status: int) -> None:
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str) and 10 < len(message) < 200 and "\n" not in message


def test_streamed_upload_over_the_limit_is_refused(client: TestClient) -> None:
    """No Content-Length: the size is counted as the body streams in."""
    def body():
        for _ in range(20):
            yield b"\0" * 10_000

    response = client.post("/api/search/image", content=body(), headers={"Content-Type": "image/png"})
    assert response.status_code == 413 and "MiB" in response.json()["error"]


TRAVERSALS = ["/image/../../etc/passwd", "/image/..%2f..%2f..%2fetc%2fpasswd", "/image/%2e%2e%2f%2e%2e%2fsecret.txt",
              "/thumb/..%2fsecret.txt", "/static/../server.py", "/static/%2e%2e/server.py",
              "/static/..%2fserver.py", "/image//etc/passwd", "/image/%2Fetc%2Fpasswd", "/image/-1", "/image/1e9",
              "/image/1.5", "/image/99999999999999999999", "/image/0x1", "/image/%00", "/thumb/-1",
              "/static/%2Fetc%2Fpasswd", "/static/index.html%00.js", "/etc/passwd", "/api/item/..%2F..%2Fsecret.txt"]


def outside_contents(collection: dict) -> list[str]:
    passwd = Path("/etc/passwd").read_text(errors="replace")[:40] if Path("/etc/passwd").exists() else SECRET
    return [SECRET, passwd, SERVER_SOURCE_MARK]


@pytest.mark.parametrize("url", TRAVERSALS)
def test_no_url_reaches_a_file_outside_the_index(client: TestClient, collection: dict, url: str) -> None:
    response = client.get(url)
    assert response.status_code in (400, 404, 405, 422), (url, response.status_code)
    assert not any(text in response.text for text in outside_contents(collection))


def test_file_deleted_since_indexing_is_404(collection: dict, tmp_path: Path) -> None:
    from clipforge.collection.index import build_index
    from clipforge.collection.server import create_app

    folder = tmp_path / "few"
    folder.mkdir()
    for name in ("a", "b"):
        draw("circle", COLORS["red" if name == "a" else "blue"]).save(folder / f"{name}.png")
    build_index(str(folder), str(tmp_path / "index"), model=str(collection["model"]))
    client = TestClient(create_app(tmp_path / "index"))
    gone = next(i for i in range(2) if client.get(f"/api/item/{i}").json()["path"].endswith("a.png"))
    (folder / "a.png").unlink()
    for url in (f"/image/{gone}", f"/thumb/{gone}"):
        response = client.get(url)
        assert response.status_code == 404 and "no longer on disk" in response.json()["error"]
    assert client.get(f"/api/item/{gone}").json()["exists"] is False


# ---- the real command: a subprocess on a free localhost port ----

@pytest.fixture(scope="module")
def server(collection: dict):
    """``clipforge serve INDEX --port 0`` as a user runs it; yields its base URL, then stops it with Ctrl-C."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "clipforge", "serve", str(collection["index_dir"]),
                                "--port", "0", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=collection["root"])
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=120)
    except queue.Empty:
        process.kill()
        pytest.fail(f"clipforge serve printed no URL: {process.stderr.read()}")
    url = line.split(" at ")[1].split()[0].rstrip("/")
    assert url.startswith("http://127.0.0.1:")
    for _ in range(100):
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=5) as response:
                assert json.load(response)["count"] == 12
                break
        except OSError:
            time.sleep(0.2)
    yield {"url": url, "process": process}
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


def api_search(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url + "/api/search", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["results"]


def test_raw_paths_and_host_check_on_the_real_server(server: dict, collection: dict) -> None:
    """http.client sends each path byte for byte (no client-side ``..`` clean-up), as curl --path-as-is does."""
    host, port = server["url"].removeprefix("http://").split(":")
    for path in TRAVERSALS + ["/image/../../../../etc/passwd", "/static/../../../etc/passwd",
                              "/" + str(collection["root"] / "secret.txt"), "/image/" + "../" * 8 + "etc/passwd"]:
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
        connection.close()
        assert response.status in (400, 404, 405, 422), (path, response.status)
        assert not any(text in body for text in outside_contents(collection)), path
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", "/api/health", headers={"Host": "attacker.example"})
    assert connection.getresponse().status == 400  # DNS rebinding: a foreign page cannot read a localhost server


def browser_or_skip():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"no browser for the end-to-end test: {', '.join(missing)} not found "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,820"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def test_page_in_a_real_browser(server: dict, collection: dict, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser_or_skip()
    url = server["url"]
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(url + "/")
        wait.until(lambda d: "12 images" in d.find_element(By.ID, "status").text)
        box = driver.find_element(By.ID, "q")
        assert driver.find_element(By.CSS_SELECTOR, "label[for=q]").get_attribute("textContent").strip()
        box.send_keys("a yellow circle", Keys.ENTER)
        wait.until(lambda d: "Results for" in d.find_element(By.ID, "summary").text
                   and len(d.find_elements(By.CSS_SELECTOR, "#results li.tile")) == 12)
        tiles = driver.find_elements(By.CSS_SELECTOR, "#results li.tile")
        top = api_search(url, {"text": "a yellow circle", "k": 24})
        assert [t.get_attribute("data-path") for t in tiles] == [r["path"] for r in top]
        assert "q=a+yellow+circle" in driver.current_url
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        driver.save_screenshot(str(tmp_path / "serve.png"))
        if os.environ.get("CLIPFORGE_SCREENSHOT") == "1":
            shutil.copy(tmp_path / "serve.png", REPO_ROOT / "docs" / "serve_screenshot.png")

        liked = int(tiles[2].get_attribute("data-id"))
        tiles[2].find_element(By.CSS_SELECTOR, "button.pick").click()
        wait.until(lambda d: f"like={liked}" in d.current_url and "More like" in d.find_element(By.ID, "summary").text)
        like_top = api_search(url, {"like": liked, "k": 24})
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#results li.tile").get_attribute("data-id")
                   == str(like_top[0]["id"]))

        driver.back()  # the query lives in the URL, so history brings the text search back
        wait.until(lambda d: "Results for" in d.find_element(By.ID, "summary").text)
        assert driver.find_element(By.ID, "q").get_attribute("value") == "a yellow circle"

        driver.find_element(By.ID, "file").send_keys(str(collection["folder"] / "07_blue_square.png"))
        wait.until(lambda d: "Images like" in d.find_element(By.ID, "summary").text)
        with (collection["folder"] / "07_blue_square.png").open("rb") as handle:
            request = urllib.request.Request(url + "/api/search/image?k=24", data=handle.read(),
                                             headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(request, timeout=30) as response:
            image_top = json.load(response)["results"]
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#results li.tile").get_attribute("data-path")
                   == image_top[0]["path"])
        assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
    finally:
        driver.quit()


def test_ctrl_c_stops_the_server_cleanly(server: dict) -> None:
    process = server["process"]
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=20) == 0
    errors = process.stderr.read()
    assert "server stopped" in errors and "Traceback" not in errors


def test_serve_refuses_a_missing_index(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from clipforge.cli.main import main
    from clipforge.cli.serve_command import is_loopback

    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
