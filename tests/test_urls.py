"""URL inputs (issue 24): images downloaded by the decoding processes from a real HTTP server on
127.0.0.1 started here, every failure an error row with the HTTP status or the reason."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY, jpeg_bytes, rgb_array, run_cli

import imgsent

KW = {"backbones": [TINY], "random_weights": True, "progress": False}
IMAGES = {f"/img{k}.jpg": jpeg_bytes(rgb_array(50, 70, k)) for k in range(6)}
FAST = {  # tests wait seconds, not minutes
    "IMGSENT_URL_READ_TIMEOUT": "1",
    "IMGSENT_URL_CONNECT_TIMEOUT": "1",
    "IMGSENT_URL_MAX_BYTES": str(1 << 20),
}


class Handler(BaseHTTPRequestHandler):
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", kind: str = "image/jpeg", **headers) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", headers.pop("length", str(len(body))))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path
        with self.lock:
            n = self.counts[path] = self.counts.get(path, 0) + 1
        if path in IMAGES:
            self._send(200, IMAGES[path])
        elif path == "/missing.jpg":
            self._send(404, b"not here", "text/plain")
        elif path == "/broken.jpg":
            self._send(500, b"oops", "text/plain")
        elif path == "/busy.jpg":  # 429 (with Retry-After), then the image
            if n == 1:
                self._send(429, b"slow down", "text/plain", Retry_After="0")
            else:
                self._send(200, IMAGES["/img1.jpg"])
        elif path == "/loop.jpg":
            self.send_response(302)
            self.send_header("Location", "/loop.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/stall.jpg":  # headers, then nothing
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.flush()
            time.sleep(4)
        elif path == "/liar.jpg":  # says 10000 bytes, sends 300 and closes
            self._send(200, IMAGES["/img2.jpg"][:300], length="10000")
            self.close_connection = True
        elif path == "/huge.jpg":  # 1 GB announced: refused before reading
            self._send(200, b"", length=str(1 << 30))
            self.close_connection = True
        elif path == "/endless.jpg":  # no length, bytes until the client stops
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            try:
                for _ in range(4096):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
            self.close_connection = True
        elif path == "/page.jpg":
            self._send(200, b"<!DOCTYPE html><html><body>Sign in to see this image</body></html>", "text/html")
        elif path == "/noai.jpg":
            self._send(200, IMAGES["/img3.jpg"], X_Robots_Tag="noai")
        else:
            self._send(404, b"", "text/plain")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def fast(monkeypatch):
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)


EXPECT = {  # path -> status "ok" or a fragment of the reason
    "/img0.jpg": "ok",
    "/img1.jpg": "ok",
    "/missing.jpg": "HTTP 404",
    "/broken.jpg": "HTTP 500",
    "/busy.jpg": "ok",
    "/loop.jpg": "too many redirects",
    "/stall.jpg": "read timeout",
    "/liar.jpg": "ended early",
    "/huge.jpg": "over the 1 MB limit",
    "/endless.jpg": "over the 1 MB limit",
    "/page.jpg": "not a recognised image format",
    "/noai.jpg": "opts out of AI use (X-Robots-Tag: noai)",
}


@pytest.mark.parametrize("workers", [0, 1])
def test_every_url_is_one_row_with_the_status_or_reason(server, fast, tmp_path, workers):
    urls = [server + p for p in EXPECT]
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    start = time.monotonic()
    imgsent.extract([f"@{listing}"], str(tmp_path / "s"), workers=workers, **KW)
    assert time.monotonic() - start < 90
    fs = imgsent.features.load(str(tmp_path / "s"), only_ok=False)
    assert sorted(fs.ids) == sorted(urls)
    got = {i[len(server) :]: (s if s == "ok" else e) for i, s, e in zip(fs.ids, fs.status, fs.error)}
    for path, want in EXPECT.items():
        assert want in got[path], (path, got[path])


def test_downloaded_images_give_the_features_of_the_same_files(server, fast, tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    for path, data in IMAGES.items():
        (folder / path.lstrip("/")).write_bytes(data)
    imgsent.extract([server + p for p in IMAGES], str(tmp_path / "a"), workers=0, **KW)
    imgsent.extract([str(folder)], str(tmp_path / "b"), workers=0, **KW)
    a, b = imgsent.features.load(str(tmp_path / "a")), imgsent.features.load(str(tmp_path / "b"))
    assert [i.rsplit("/", 1)[1] for i in a.ids] == b.ids
    np.testing.assert_array_equal(a.X, b.X)


def test_a_parquet_column_of_urls_is_downloaded(server, fast, tmp_path):
    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "url": [server + "/img4.jpg", server + "/missing.jpg", "not a url"]}),
        tmp_path / "posts.parquet",
    )
    imgsent.extract(
        [str(tmp_path / "posts.parquet")], str(tmp_path / "s"), workers=0, image_column="url", id_column="id", **KW
    )
    fs = imgsent.features.load(str(tmp_path / "s"), only_ok=False)
    assert fs.status == ["ok", "error", "error"]
    assert "HTTP 404" in fs.error[1] and "nor an http(s) URL" in fs.error[2]


def test_urls_from_the_cli_score_to_json_lines(server, fast, tiny_model, capsys, monkeypatch):
    argv = ["score", server + "/img0.jpg", server + "/missing.jpg", "--model", tiny_model, "--out", "-", "-q"]
    code, out, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err
    assert out.count("\n") == 2 and '"status":"ok"' in out and "HTTP 404" in out


def test_keep_images_saves_what_was_downloaded_and_rows_point_at_the_copies(server, fast, tmp_path):
    keep = tmp_path / "kept"
    keep.mkdir()
    urls = [server + "/img0.jpg", server + "/img5.jpg", server + "/missing.jpg"]
    imgsent.extract(urls, str(tmp_path / "s"), workers=0, keep_images=str(keep), **KW)
    fs = imgsent.features.load(str(tmp_path / "s"), only_ok=False)
    assert fs.ids == sorted(urls) and fs.status == ["ok", "ok", "error"]
    saved = sorted(keep.iterdir())
    assert len(saved) == 2 and all(p.suffix == ".jpg" for p in saved)
    assert {p.read_bytes() for p in saved} == {IMAGES["/img0.jpg"], IMAGES["/img5.jpg"]}
    assert set(fs.paths[:2]) == {str(p) for p in saved} and fs.paths[2] == urls[2]
    with pytest.raises(imgsent.ImgsentError, match="no such folder"):
        imgsent.extract(urls, str(tmp_path / "t"), workers=0, keep_images=str(tmp_path / "nope"), **KW)
