"""The same images as a folder, as tar shards, as a Parquet image column and as URLs, side by side.

    python bench/inputs_bench.py [--images 400] [--repeat 2] [--latency 0.05] [--model default]

Writes the first ``--images`` Twitter I images (``../shared``) as: a folder of JPEGs; img2dataset-
style tar shards of 100 (``KEY.jpg`` + ``KEY.json``); one Parquet file with the bytes in a column
(row groups of 64); and URLs served by an HTTP server on 127.0.0.1 that waits ``--latency`` seconds
before each answer (a remote site's round trip). Then, in turns (``--repeat`` rounds),
``imgsent.score`` over each with the same model and settings (start-up excluded: the model is
loaded in this process before the first timed run), and prints one JSON object: images/s per kind
(median), and each kind's rate over the folder's. Issue 24's targets: tar and Parquet >= 0.95x the
folder, URLs >= 0.8x with the default concurrency.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from _common import TWITTER, require_shared

import imgsent


def build_inputs(n: int, root: Path) -> dict[str, list[str] | dict]:
    files = sorted(TWITTER.glob("*.jpg"))[:n]
    data = [f.read_bytes() for f in files]
    folder = root / "folder"
    folder.mkdir()
    for f, d in zip(files, data):
        (folder / f.name).write_bytes(d)
    shards = root / "shards"
    shards.mkdir()
    for s in range(0, n, 100):
        with tarfile.open(shards / f"{s // 100:05d}.tar", "w") as tar:
            for k in range(s, min(s + 100, n)):
                for name, body in ((f"{k:09d}.jpg", data[k]), (f"{k:09d}.json", json.dumps({"key": k}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"name": [f.name for f in files], "image": data}), root / "posts.parquet", row_group_size=64
    )
    return {"files": files, "data": data}


def serve(data: dict[str, bytes], latency: float) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            time.sleep(latency)
            body = data.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    require_shared()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        built = build_inputs(args.images, root)
        httpd, base = serve({f"/{f.name}": d for f, d in zip(built["files"], built["data"])}, args.latency)
        (root / "urls.txt").write_text("".join(f"{base}/{f.name}\n" for f in built["files"]))
        kinds = {
            "folder": ([str(root / "folder")], {}),
            "tar": ([str(root / "shards")], {}),
            "parquet": ([str(root / "posts.parquet")], {"image_column": "image", "id_column": "name"}),
            "urls": ([f"@{root / 'urls.txt'}"], {}),
        }
        imgsent.score([str(root / "folder" / built["files"][0].name)], str(root / "warm.parquet"), model=args.model)
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(args.repeat):
            for kind, (inputs, extra) in kinds.items():
                out = root / f"{kind}{r}.parquet"
                t = time.perf_counter()
                summary = imgsent.score(inputs, str(out), model=args.model, **extra)
                elapsed = time.perf_counter() - t
                if summary.ok != args.images:
                    sys.exit(f"{kind}: {summary.ok} of {args.images} images scored")
                rates[kind].append(args.images / elapsed)
        httpd.shutdown()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        json.dumps(
            {
                "images": args.images,
                "model": args.model,
                "latency_s": args.latency,
                "images_per_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
                "median_images_per_s": {k: round(v, 2) for k, v in med.items()},
                "vs_folder": {k: round(v / med["folder"], 3) for k, v in med.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
