"""The labelling page and its JSON API (Starlette, served by uvicorn), over a :class:`LabelSession`.

Every request needs the token: ``Authorization: Bearer T`` or ``?token=T`` (the page's own URL
carries it; the page then sends the header). Without it 401, with a wrong one 403. The image
endpoint serves the collection's images by id only: a request never names a path.

    GET  /                      the page (plain HTML, CSS and JS shipped in the package; no CDN)
    GET  /api/next              {"id", "image", "mode", "p", "guess"}; "id": null when nothing is left
    POST /api/label             {"id", "label"} (label null = skip) -> {"labelled": N}
    POST /api/undo              -> {"undone": id, "labelled": N}
    GET  /api/status            counts, the live estimates and the model's state
    GET  /api/image?id=ID       the image's bytes
Optional: ``annotator`` (query, or a JSON field) names who labels (default the server's
``--annotator``); ``/api/next?wait=S`` first waits up to S seconds for the model to learn every
label so far.
"""

from __future__ import annotations

import hmac
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import quote

PREVIEW = 1024  # the longer side of the images the page shows, in pixels


if TYPE_CHECKING:  # labelling starts the server (imgsent.labelling.label): no import back
    from .labelling import LabelSession


def create_app(session: LabelSession, token: str):
    """The ASGI app of the page and the API over ``session``."""
    import anyio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def authorised(request: Request) -> JSONResponse | None:
        given = request.query_params.get("token")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            return error(401, "this page needs its token: open the URL imgsent label printed")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return error(403, "wrong token")
        return None

    async def body(request: Request) -> dict | JSONResponse:
        try:
            data = await request.json()
        except ValueError:
            return error(400, "the body must be a JSON object")
        return data if isinstance(data, dict) else error(400, "the body must be a JSON object")

    def who(request: Request, data: dict | None = None) -> str | None:
        name = (data or {}).get("annotator") or request.query_params.get("annotator")
        return str(name)[:100] if name else None

    async def page(request: Request):
        if (denied := authorised(request)) is not None:
            return denied
        html = resources.files("imgsent").joinpath("labelpage/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def next_image(request: Request):
        if (denied := authorised(request)) is not None:
            return denied
        try:
            wait = min(float(request.query_params.get("wait", 0)), 600.0)
        except ValueError:
            return error(400, "wait must be a number of seconds")
        offer = await anyio.to_thread.run_sync(lambda: session.next(who(request), wait=wait))
        if offer is None:
            return JSONResponse({"id": None, "image": None, "mode": None, "p": None, "guess": None})
        return JSONResponse(
            {
                "id": offer.id,
                "image": f"/api/image?id={quote(offer.id, safe='')}",
                "mode": offer.mode,
                "p": offer.p,
                "guess": offer.guess,
            }
        )

    async def label(request: Request):
        if (denied := authorised(request)) is not None:
            return denied
        data = await body(request)
        if isinstance(data, JSONResponse):
            return data
        rid, value = data.get("id"), data.get("label")
        if not isinstance(rid, str):
            return error(400, "give the image's id as a string")
        if value is not None and not isinstance(value, str):
            return error(400, "label must be a class name, or null to skip")
        try:
            n = session.label(rid, value, who(request, data))
        except KeyError:
            return error(404, f"no image with id {rid!r} in this collection")
        except ValueError as exc:
            return error(422, str(exc))
        except LookupError as exc:
            return error(409, str(exc))
        return JSONResponse({"labelled": n})

    async def undo(request: Request):
        if (denied := authorised(request)) is not None:
            return denied
        data = await body(request) if await request.body() else {}
        if isinstance(data, JSONResponse):
            return data
        try:
            row = session.undo(who(request, data))
        except LookupError as exc:
            return error(409, str(exc))
        return JSONResponse({"undone": row.id, "labelled": session.labelled()})

    async def status(request: Request):
        if (denied := authorised(request)) is not None:
            return denied
        return JSONResponse(await anyio.to_thread.run_sync(session.status))

    async def image(request: Request):
        if (denied := authorised(request)) is not None:
            return denied
        rid = request.query_params.get("id", "")
        k = session.index.get(rid)
        if k is None:
            return error(404, f"no image with id {rid!r} in this collection")
        path = session.paths[k]
        from .decode import DecodeError, preview_jpeg

        try:
            data = await anyio.to_thread.run_sync(preview_jpeg, path, PREVIEW, 85, session.sources[k])
        except DecodeError as exc:
            return error(404, f"image {rid!r} cannot be shown from {path}: {exc}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/next", next_image),
            Route("/api/label", label, methods=["POST"]),
            Route("/api/undo", undo, methods=["POST"]),
            Route("/api/status", status),
            Route("/api/image", image),
        ]
    )


def bind(host: str, port: int):
    """A listening socket on ``host:port`` (0: any free port), or ImgsentError naming the problem."""
    import socket

    from .errors import ImgsentError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ImgsentError(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port (0: any free one)"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(session: LabelSession, token: str, sock, *, quiet: bool = False) -> None:
    """Serve until Ctrl-C or SIGTERM (uvicorn's graceful shutdown), on the bound ``sock``."""
    import uvicorn

    config = uvicorn.Config(
        create_app(session, token),
        log_level="warning" if quiet else "info",
        access_log=False,
        lifespan="off",
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # Ctrl-C / SIGTERM is how the loop ends: not raised again

    Server(config).run(sockets=[sock])
