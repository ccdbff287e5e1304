"""``imagegen review``: a small web app to look at prompt sets, keep or reject images, and see
their replacements (Starlette, jinja2 templates with autoescape, plain JavaScript).

Safe by default: it binds 127.0.0.1; another host needs IMAGEGEN_REVIEW_TOKEN, and when a token
is set every request needs it (``?token=`` once, which sets a cookie and redirects to the same
page without it; or ``Authorization: Bearer``), compared in constant time and never logged
(uvicorn's access log, which prints query strings, is off). Files are served only from the
images, clips and thumbnails folders of the storage, each path checked and resolved inside it.
A verdict is a JSON POST (a cross-site form cannot send one) appended as its own Parquet part.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlencode

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from imagegen_pipeline.reviews import VERDICTS, VerdictCache, record_verdict
from imagegen_pipeline.steps.review import (
    SORTS,
    ReviewFilter,
    filtered,
    generated_images,
    history_of,
    prompt_sets,
    set_summary,
    with_verdicts,
)
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.thumbnails import ensure_thumbnail

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
TOKEN_VARIABLE = "IMAGEGEN_REVIEW_TOKEN"
SESSION_COOKIE = "imagegen_review"
PAGE_SIZE = 120
SERVED_FOLDERS = ("images", "clips")
CONTENT_TYPES = {".png": "image/png", ".webp": "image/webp", ".mp4": "video/mp4"}
IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
NOT_FOUND = Response("Not found", status_code=404, media_type="text/plain")


def session_value(token: str) -> str:
    """What the cookie holds: derived from the token, so the token itself is not stored."""
    return hmac.new(token.encode(), b"imagegen-review-session", hashlib.sha256).hexdigest()


def served_path(storage: Storage, relative: str) -> Any | None:
    """The file ``relative`` names inside the served folders of the storage, or None.

    Refused: an absolute path, a backslash, an empty, ``.`` or ``..`` segment (after the URL
    was decoded, so ``%2e%2e`` too), a folder not served, and on a disk anything whose real
    path (symbolic links followed) leaves the storage."""
    if not relative or relative.startswith("/") or "\\" in relative or "\x00" in relative:
        return None
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts) or parts[0] not in SERVED_FOLDERS:
        return None
    path = storage.path(*parts)
    if storage.is_local:
        base = os.path.realpath(storage.base.path)
        real = os.path.realpath(path.path)
        if os.path.commonpath([base, real]) != base or not os.path.isfile(real):
            return None
    return path


def relative_to_storage(storage: Storage, location: str) -> str:
    """A recorded path (absolute or a URL) relative to the storage base, for /files/ links."""
    base = str(storage.base).rstrip("/")
    text = str(location)
    if text.startswith(base + "/"):
        return text[len(base) + 1 :]
    if storage.is_local:
        return Path(os.path.relpath(text, storage.base.path)).as_posix()
    return text


class TokenCheck(BaseHTTPMiddleware):
    """Every request needs the token when one is set."""

    def __init__(self, app: Any, token: str | None) -> None:
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        if not self.token:
            return await call_next(request)
        expected = session_value(self.token)
        given = request.query_params.get("token")
        if given is not None:
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return Response("Wrong token", status_code=403, media_type="text/plain")
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(SESSION_COOKIE, expected, httponly=True, samesite="strict")
            return response
        cookie = request.cookies.get(SESSION_COOKIE, "")
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if hmac.compare_digest(cookie.encode(), expected.encode()) or (
            bearer and hmac.compare_digest(bearer.encode(), self.token.encode())
        ):
            return await call_next(request)
        return Response(
            "This review app needs its token: open it once with ?token=...",
            status_code=401,
            media_type="text/plain",
        )


class ReviewApp:
    """The pages and the verdict API over one storage."""

    def __init__(self, storage: Storage, gate: float, reviewer: str) -> None:
        self.storage = storage
        self.gate = gate
        self.reviewer = reviewer
        self.verdicts = VerdictCache(storage)
        self._generated: dict[str, tuple[tuple, pd.DataFrame]] = {}
        self._paths: dict[str, dict[tuple[str, str], str]] = {}  # (backend, image id) -> path
        self.templates = Environment(
            loader=PackageLoader("imagegen_pipeline", "review_templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )

    def _signature(self, prompt_set: str) -> tuple:
        # What generated_images reads: a new part, table or clip changes a listing.
        listings = [
            self.storage.path("run_metadata", table, prompt_set) for table in ("images", "clips")
        ]
        listings.append(self.storage.path("tables", "quality"))
        return tuple(tuple(sorted(self.storage.list_files(f).items())) for f in listings)

    def rows(self, prompt_set: str) -> pd.DataFrame:
        """A set's images with their verdicts; the generated part is cached until it changes."""
        signature = self._signature(prompt_set)
        cached = self._generated.get(prompt_set)
        if cached is None or cached[0] != signature:
            cached = (signature, generated_images(self.storage, prompt_set))
            self._generated[prompt_set] = cached
            rows = cached[1]
            keys = zip(rows["backend"], rows["image_id"], strict=True)
            self._paths[prompt_set] = dict(zip(keys, rows["path"], strict=True))
        return with_verdicts(cached[1], self.verdicts.latest(prompt_set))

    def render(self, template: str, **values: Any) -> Response:
        html = self.templates.get_template(template).render(**values)
        return Response(html, media_type="text/html; charset=utf-8")

    async def sets(self, request: Request) -> Response:
        summaries = [(name, set_summary(self.rows(name))) for name in prompt_sets(self.storage)]
        return self.render("sets.html.j2", sets=summaries, storage=str(self.storage.base))

    def _known_set(self, request: Request) -> str | None:
        name = request.path_params["prompt_set"]
        return name if name in prompt_sets(self.storage) else None

    async def prompt_set(self, request: Request) -> Response:
        name = self._known_set(request)
        if name is None:
            return NOT_FOUND
        query = request.query_params
        wanted = ReviewFilter(
            backend=query.get("backend", ""),
            min_score=_number(query.get("min_score")),
            max_score=_number(query.get("max_score")),
            below_gate=query.get("below_gate") == "1",
            unreviewed=query.get("unreviewed") == "1",
            lora=query.get("lora", ""),
            sort=query.get("sort", "gallery"),
        )
        rows = self.rows(name)
        view = filtered(rows, wanted, self.gate)
        pages = max(1, math.ceil(len(view) / PAGE_SIZE))
        page = min(max(1, int(_number(query.get("page")) or 1)), pages)
        shown = view.iloc[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        by_prompt = query.get("view") == "prompts"
        cards = [self._card(name, row) for row in shown.to_dict("records")]
        keep = [(k, v) for k, v in query.multi_items() if k != "page"]
        return self.render(
            "set.html.j2",
            prompt_set=name,
            cards=cards,
            by_prompt=_by_prompt(cards) if by_prompt else None,
            backends=sorted(rows["backend"].unique()),
            filter=wanted,
            sorts=list(SORTS),
            view="prompts" if by_prompt else "grid",
            summary=set_summary(rows),
            matching=len(view),
            page=page,
            pages=pages,
            page_query=lambda n: urlencode([*keep, ("page", n)]),
            gate=self.gate,
            reviewer=self.reviewer,
        )

    def _card(self, prompt_set: str, row: dict[str, Any]) -> dict[str, Any]:
        card = {k: (None if _missing(v) else v) for k, v in row.items()}
        card["thumb"] = f"/thumbs/{prompt_set}/{row['backend']}/{row['image_id']}.webp"
        card["detail"] = f"/sets/{prompt_set}/images/{row['backend']}/{row['image_id']}"
        return card

    async def image(self, request: Request) -> Response:
        name = self._known_set(request)
        image_id = request.path_params["image_id"]
        if name is None or not IMAGE_ID.match(image_id):
            return NOT_FOUND
        rows = self.rows(name)
        rows = rows[rows["backend"] == request.path_params["backend"]]
        chain = [self._card(name, row) for row in history_of(rows, image_id)]
        if not chain:
            return NOT_FOUND
        for card in chain:
            card["file"] = "/files/" + relative_to_storage(self.storage, card["path"])
            if card.get("clip_path"):
                card["clip"] = "/files/" + relative_to_storage(self.storage, card["clip_path"])
        newer = chain[0].get("replaced_by")
        return self.render(
            "image.html.j2", prompt_set=name, image=chain[0], history=chain[1:], newer=newer
        )

    async def thumbnail(self, request: Request) -> Response:
        name, backend = request.path_params["prompt_set"], request.path_params["backend"]
        image_id = request.path_params["image_id"]
        if not IMAGE_ID.match(image_id):
            return NOT_FOUND
        # A grid's thumbnails follow its page: the set's rows are cached (a set never shown is
        # checked against the listing first), and a thumbnail is looked up, not searched for.
        if name not in self._paths:
            if self._known_set(request) is None:
                return NOT_FOUND
            self.rows(name)
        source = self._paths[name].get((backend, image_id))
        if source is None:
            return NOT_FOUND
        data = ensure_thumbnail(self.storage, name, backend, image_id, source)
        headers = {"Cache-Control": "max-age=31536000, immutable"}  # named by content
        return Response(data, media_type="image/webp", headers=headers)

    async def file(self, request: Request) -> Response:
        path = served_path(self.storage, request.path_params["path"])
        media = CONTENT_TYPES.get(PurePosixPath(str(path)).suffix) if path else None
        if path is None or media is None:
            return NOT_FOUND
        try:
            return Response(self.storage.read_bytes(path), media_type=media)
        except FileNotFoundError:
            return NOT_FOUND

    async def verdict(self, request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0] != "application/json":
            return JSONResponse({"error": "send JSON"}, status_code=415)
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
            return JSONResponse({"error": "cross-origin request"}, status_code=403)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "send a JSON object"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "send a JSON object"}, status_code=400)
        prompt_set, backend = str(body.get("prompt_set", "")), str(body.get("backend", ""))
        image_id, verdict = str(body.get("image_id", "")), str(body.get("verdict", ""))
        if verdict not in VERDICTS or not IMAGE_ID.match(image_id):
            return JSONResponse({"error": "verdict must be keep or reject"}, status_code=400)
        if prompt_set not in prompt_sets(self.storage):
            return JSONResponse({"error": "unknown prompt set"}, status_code=404)
        rows = self.rows(prompt_set)
        if not ((rows["image_id"] == image_id) & (rows["backend"] == backend)).any():
            return JSONResponse({"error": "unknown image"}, status_code=404)
        reviewer = str(body.get("reviewer") or self.reviewer)[:100]
        note = str(body.get("note") or "")
        part = record_verdict(
            self.storage, prompt_set, backend, image_id, verdict, note=note, reviewer=reviewer
        )
        # The set's counts as they stand now, for the page's header.
        summary = set_summary(self.rows(prompt_set))
        return JSONResponse({"saved": part, "verdict": verdict, "summary": summary})


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT


def _by_prompt(cards: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, list]]]:
    grouped: dict[str, dict[str, list]] = {}
    prompts: dict[str, str] = {}
    for card in cards:
        grouped.setdefault(card["prompt_id"], {}).setdefault(card["backend"], []).append(card)
        prompts.setdefault(card["prompt_id"], card["prompt"])
    return [(pid, prompts[pid], backends) for pid, backends in grouped.items()]


def create_app(
    storage: Storage, *, token: str | None = None, gate: float = 20.0, reviewer: str = ""
) -> Starlette:
    """The review app over ``storage``; with ``token``, every request must carry it."""
    app = ReviewApp(storage, gate, reviewer or getpass.getuser())
    routes = [
        Route("/", app.sets),
        Route("/sets/{prompt_set}", app.prompt_set),
        Route("/sets/{prompt_set}/images/{backend}/{image_id}", app.image),
        Route("/thumbs/{prompt_set}/{backend}/{image_id}.webp", app.thumbnail),
        Route("/files/{path:path}", app.file),
        Route("/api/verdicts", app.verdict, methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(TokenCheck, token=token)])


def check_binding(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if host not in LOOPBACK_HOSTS and not token:
        raise SystemExit(
            f"imagegen review: --host {host} lets other machines in: set {TOKEN_VARIABLE} "
            "(every request must then carry it), or keep the default 127.0.0.1."
        )


def serve(storage: Storage, host: str, port: int, token: str | None, gate: float) -> None:
    """Run the app until interrupted."""
    import uvicorn

    check_binding(host, token)
    app = create_app(storage, token=token, gate=gate)
    where = f"http://{host}:{port}/"
    print(f"Review app on {where}" + (" (append ?token=... once)" if token else ""))
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
