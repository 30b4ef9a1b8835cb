"""The HTTP service: a FastAPI app in front of the job queue (`jobs.py`), and its uvicorn runner.

    POST /v1/jobs            multipart: image file + options (same names and checks as the CLI) + lora -> 202 {id}
    GET  /v1/jobs            the jobs, newest first, paged (?limit=, ?before=ID)
    GET  /v1/jobs/{id}       state, step i of n, queue position, metadata once done
    GET  /v1/jobs/{id}/events   the same as server-sent events, pushed on every change
    GET  /v1/jobs/{id}/result   the PNG (its "sdx4" text chunk holds the metadata); ?index=i for num_images > 1
    DELETE /v1/jobs/{id}     cancel (a running job stops at its next step) or forget a finished one
    POST /v1/upscale         synchronous: the same form, answers with the PNG
    POST /v1/estimate        form: input_width, input_height + options -> {seconds, peak_bytes, output_size, summary}
    GET  /v1/info            model, device, dtype, limits, version
    GET  /health             200 while serving, 503 while shutting down
    GET  /                   the web page (static files, no build step, no CDN)

Request handlers never run the model: they check the request (size, format, pixel counts from the
image header BEFORE decoding, options, the job's cost), decode in a thread pool, and queue. Errors are JSON
`{"detail": message, "field": name-or-null}` with 400/401/403/404/408/409/413/415/422/429/503. Before any
route, guard.py checks Host, Origin, the API key and the body's size and time, and adds security headers;
`uvicorn_config` bounds connections (docs/server.md, "Threat model")."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from .._version import __version__
from ..imageio import LoadedImage
from ..metadata import service_info
from ..options import METHODS, UpscaleOptions, size_tag
from .guard import Guard, RateLimitedLog, guarded_protocol, quiet_access_log
from .jobs import FINISHED, JobManager, QueueFull, ShuttingDown
from .requests import (
    ESTIMATE_SIZE_FIELDS,
    FORM_FIELDS,
    FORM_OVERHEAD_BYTES,
    IMAGE_PART_TYPES,
    LORA_FIELD,
    OPTION_KINDS,
    OPTION_NAMES,
    ApiError,
    Changes,
    LoraChoices,
    ServerSettings,
    check_cost,
    decode_upload,
    download_name,
    parse_estimate,
    parse_options,
    public_model_name,
    safe_name,
    service_option_defaults,
    short,
)

log = logging.getLogger("sdx4.server")

# ---- the app -------------------------------------------------------------------------------------


STATIC_DIR = Path(__file__).parent / "static"
SSE_POLL_S = 0.5  # waits wake on every job change; this bounds how late a client disconnect is noticed
SSE_HEARTBEAT_S = 15.0
MAX_LIST = 100  # jobs per page of GET /v1/jobs


def create_app(upscaler: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The ASGI app. `upscaler` is an `sdx4.Upscaler` (or anything called the same way with an `info`
    dict); only the app's worker thread calls it. The worker starts and stops with the app's lifespan.
    The LoRAs merged into `upscaler` now (`Upscaler.loras`) are the ones jobs may choose among (`lora`).
    """
    settings = settings or ServerSettings()
    model_info = dict(getattr(upscaler, "info", {}) or {})
    if not settings.expose_paths and "model" in model_info:
        model_info["model"] = public_model_name(model_info["model"])
    max_noise_level = int(model_info.get("max_noise_level", 350))
    cost_of = getattr(upscaler, "cost", None)  # Upscaler.cost; a stand-in without it costs nothing
    from .media import MediaAware

    # The LoRAs merged at start (`sdx4 serve --lora`) are offered: each job merges all of them (the default),
    # some, or none (its `lora` field). A stand-in without set_loras cannot switch: jobs run on it as it is.
    lora_choices = LoraChoices(tuple(upscaler.loras)) if callable(getattr(upscaler, "set_loras", None)) else None

    def switch_loras(names: tuple[str, ...]) -> None:  # the worker's thread, between jobs; a no-op when merged
        assert lora_choices is not None
        upscaler.set_loras(lora_choices.specs_of(names))

    worker_upscaler = upscaler if settings.expose_paths else _PublicPaths(upscaler)
    # Animation and video jobs (service/media.py) run through the same worker, frame by frame.
    manager = JobManager(MediaAware(worker_upscaler, lambda: manager.results_dir), settings.queue,
                         switch_loras=switch_loras if lora_choices is not None else None)
    queued_cost: dict[str, float] = {}  # job id -> cost, for the jobs still queued (pruned on each submit)
    estimate_of = getattr(upscaler, "estimate", None)  # Upscaler.estimate; a stand-in without it: classical only
    estimated: dict[str, float] = {}  # job id -> estimated seconds (pruned on each submit)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()
        app.state.changes = Changes(app.state.loop)
        manager.on_change = app.state.changes.poke
        calibrate = getattr(upscaler, "calibrate", None)
        if calibrate is not None:  # time estimates: measured (once per machine) before the worker owns the model
            await run_in_threadpool(calibrate)
        manager.start()
        log.info("serving %s; results in %s", model_info.get("model", "model"), manager.results_dir)
        try:
            yield
        finally:
            await run_in_threadpool(manager.close, settings.shutdown_timeout_s)

    app = FastAPI(
        title="sdx4",
        version=__version__,
        description="Upscale images 4x with the Stable Diffusion x4 Upscaler (or a classical filter).",
        lifespan=lifespan,
    )
    app.state.manager = manager
    app.state.settings = settings
    app.add_middleware(Guard, settings=settings, say=RateLimitedLog())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "field": exc.field, **exc.extra}, status_code=exc.status, headers=exc.headers)

    def job_cost(options: UpscaleOptions, size: tuple[int, int]) -> float:
        return float(cost_of(options, size).megapixel_steps) if cost_of is not None else 0.0

    async def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None or not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def refuse_if_stopping() -> None:
        if manager.stopping:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": "30", "Connection": "close"})

    def parse_lora(raw: str | None, method: str) -> tuple[str, ...] | None:
        """The `lora` field -> the job's LoRA names (LoraChoices.parse), or None: nothing to switch."""
        if lora_choices is None:
            if (raw or "").strip():
                raise ApiError(422, "lora: this server's model cannot switch LoRAs; leave lora out", LORA_FIELD)
            return None
        return lora_choices.parse(raw, method)

    async def read_submission(request: Request) -> tuple[LoadedImage, UpscaleOptions, str, tuple[str, ...] | None]:
        """Read the multipart body within the byte limit, check options (and the LoRA choice), check and decode
        the image."""
        refuse_if_stopping()
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise ApiError(
                415,
                f"send multipart/form-data with the picture in a file field named 'image'; got {ctype or 'no content type'!r}",
            )
        limit = settings.max_upload_bytes + FORM_OVERHEAD_BYTES
        declared = request.headers.get("content-length")
        too_big = f"upload is over the limit of {settings.max_upload_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, too_big, "image", headers={"Connection": "close"})
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, too_big, "image", headers={"Connection": "close"})

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=len(FORM_FIELDS) + 1)
        except Exception as e:  # starlette raises HTTPException(400) on malformed multipart
            raise ApiError(400, f"malformed multipart body: {getattr(e, 'detail', e)}") from None
        try:
            upload = form.get("image")
            fields: dict[str, str] = {}
            for key, value in form.multi_items():
                if key == "image":
                    continue
                if key not in FORM_FIELDS:
                    raise ApiError(422, f"unknown field {short(key)!r}; allowed: image, {', '.join(FORM_FIELDS)}", key)
                if not isinstance(value, str):
                    raise ApiError(422, f"{key}: expected a text field, got a file", key)
                if key in fields:
                    raise ApiError(422, f"{key}: given more than once", key)
                fields[key] = value
            raw_lora = fields.pop(LORA_FIELD, None)
            options = parse_options(fields, settings.max_prompt_chars)
            if options.noise_level > max_noise_level:
                raise ApiError(422, f"noise_level must be in 0..{max_noise_level}; got {options.noise_level}", "noise_level")
            loras = parse_lora(raw_lora, options.method)
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "image: missing; send the picture as a multipart file field named 'image'", "image")
            part_type = (upload.content_type or "application/octet-stream").lower()
            if not part_type.startswith((*IMAGE_PART_TYPES, "video/")):  # a video: service/media.py decides
                raise ApiError(415, f"image: content type {part_type!r} is not an image", "image")
            data = await upload.read()
            if len(data) > settings.max_upload_bytes:
                raise ApiError(413, too_big, "image")
            name = safe_name(upload.filename)
            from .media import media_upload

            media = await run_in_threadpool(media_upload, data, part_type, name, options, settings)
            if media is not None:  # an animation or a video: its cost is every frame's
                check_cost(name, media.size, job_cost(options, media.size) * media.frames, settings)
                return media, options, name, loras
            admit = lambda size: check_cost(name, size, job_cost(options, size), settings)  # noqa: E731
            image = await run_in_threadpool(decode_upload, data, settings, options.num_images, name, options.scale, admit,
                                            options.output_size)
            return image, options, name, loras
        finally:
            await form.close()

    def submit(image: LoadedImage, options: UpscaleOptions, name: str, loras: tuple[str, ...] | None) -> str:
        cost = job_cost(options, image.size) * max(1, getattr(image, "frames", 1))  # frames: an animation or video
        for job_id in list(queued_cost):
            snap = manager.snapshot(job_id)
            if snap is None or snap["state"] != "queued":
                del queued_cost[job_id]
        waiting = sum(queued_cost.values())
        if queued_cost and waiting + cost > settings.max_queue_cost:
            raise ApiError(
                429,
                f"the queue is full: {waiting:.3g} megapixel-steps waiting, this job {cost:.3g}, the limit is {settings.max_queue_cost:g}",
                headers={"Retry-After": str(max(1, min(3600, manager.status()["queued"] * 5)))},
                extra={"limit": settings.max_queue_cost, "queued_cost": round(waiting, 3), "cost": round(cost, 3)},
            )
        try:
            job_id = manager.submit(image, options, name, loras).id
            queued_cost[job_id] = cost
            for known in list(estimated):
                if manager.snapshot(known) is None:
                    del estimated[known]
            if estimate_of is not None:
                try:
                    estimated[job_id] = round(float(estimate_of(image.size, options).seconds), 3)
                except ValueError as e:  # a plan that cannot fit: the job reports it when it runs; no estimate
                    log.info("no time estimate for job %s: %s", job_id, e)
            return job_id
        except QueueFull as e:
            raise ApiError(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            raise ApiError(503, str(e), headers={"Retry-After": "30"}) from None

    def job_or_404(job_id: str) -> dict[str, Any]:
        snap = manager.snapshot(job_id)
        if snap is None:
            raise ApiError(404, f"no job {short(job_id)!r} (unknown, deleted or expired)")
        return _public(snap)

    def _public(snap: dict[str, Any]) -> dict[str, Any]:
        snap = dict(snap)
        if snap.get("id") in estimated:
            snap["estimate_seconds"] = estimated[snap["id"]]
        if snap["state"] == "done":
            n = snap["num_images"]
            snap["result_urls"] = [f"/v1/jobs/{snap['id']}/result" + (f"?index={i}" if i else "") for i in range(n)]
        return snap

    form_schema = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": {"type": "string", "format": "binary", "description": "the picture (PNG, JPEG, WebP, ...)"},
                            **{
                                k: {"type": OPTION_KINDS[k][0], "default": v, **({"enum": list(OPTION_KINDS[k][1])} if OPTION_KINDS[k][1] else {})}
                                for k, v in service_option_defaults().items()
                            },
                            LORA_FIELD: {
                                "type": "string",
                                "description": "the LoRAs merged for this job: none, or the names of LoRAs the server offers "
                                "(GET /v1/info `loras`) separated by commas, each at its serve-time scale; default: all of them",
                            },
                        },
                    }
                }
            },
        }
    }

    v1 = [Depends(require_key)]

    @app.post("/v1/jobs", status_code=202, dependencies=v1, openapi_extra=form_schema, tags=["jobs"])
    async def create_job(request: Request) -> JSONResponse:
        """Queue an upscale; answers 202 with the job id and where to poll."""
        image, options, name, loras = await read_submission(request)
        job_id = submit(image, options, name, loras)
        return JSONResponse(
            _public(manager.snapshot(job_id) or {"id": job_id, "state": "queued"}) | {"url": f"/v1/jobs/{job_id}"},
            status_code=202,
            headers={"Location": f"/v1/jobs/{job_id}"},
        )

    @app.get("/v1/jobs", dependencies=v1, tags=["jobs"])
    async def list_jobs(limit: str = "20", before: str | None = None) -> dict[str, Any]:
        """Jobs newest first, `limit` (1..100) per page; the next page: `?before=` the answer's `next`
        (null on the last page). Each: id, state, created, finished, step, total, progress, input name, error."""
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIST:
            raise ApiError(422, f"limit must be an integer in 1..{MAX_LIST}; got {short(limit)!r}", "limit")
        try:
            return manager.list_jobs(int(limit), before)
        except KeyError:
            raise ApiError(422, f"before must be the id of a listed job; got {short(before or '')!r} (unknown, deleted or expired)", "before") from None

    @app.get("/v1/jobs/{job_id}", dependencies=v1, tags=["jobs"])
    async def get_job(job_id: str) -> dict[str, Any]:
        """State, progress (step of total), queue position, error; metadata and result URLs once done."""
        return job_or_404(job_id)

    @app.get("/v1/jobs/{job_id}/events", dependencies=v1, tags=["jobs"], response_class=StreamingResponse)
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: `progress` on every change, then one of `done`, `failed`, `cancelled`."""
        job_or_404(job_id)

        async def stream() -> AsyncIterator[str]:
            last, beat = -1, time.monotonic()
            while True:
                since = app.state.changes.event
                version = manager.version(job_id)
                if version is None:
                    yield _sse("failed", {"id": job_id, "state": "failed", "error": "the job was deleted or expired"})
                    return
                if version != last:
                    snap = manager.snapshot(job_id)
                    if snap is None:
                        continue
                    last = snap["version"]
                    finished = snap["state"] in FINISHED
                    yield _sse(snap["state"] if finished else "progress", _public(snap))
                    if finished:
                        return
                    beat = time.monotonic()
                elif time.monotonic() - beat > SSE_HEARTBEAT_S:
                    yield ": keep-alive\n\n"
                    beat = time.monotonic()
                await app.state.changes.wait(since, SSE_POLL_S)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def result_response(job_id: str, index: int, disposition: str) -> Response:
        snap = job_or_404(job_id)
        if snap["state"] != "done":
            why = f": {snap['error']}" if snap.get("error") else ""
            raise ApiError(409, f"job {job_id} is {snap['state']}{why}; no result" + (" yet" if snap["state"] not in FINISHED else ""))
        path = manager.result_file(job_id, index)
        if path is None:
            raise ApiError(404, f"index must be in 0..{snap['num_images'] - 1}; got {index}", "index")
        try:
            data = await run_in_threadpool(path.read_bytes)
        except FileNotFoundError:
            raise ApiError(404, f"the result of job {job_id} has expired") from None
        o = snap["options"]  # a scale, or width/height (older stored jobs have neither key)
        filename = download_name(snap["input_name"], index, snap["num_images"], size_tag(o["scale"], o.get("width"), o.get("height")))
        from .media import MEDIA_TYPES  # an animation keeps its format, a video its container

        filename = filename.rsplit(".", 1)[0] + path.suffix
        return Response(
            data,
            media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
            headers={
                "Content-Disposition": f'{disposition}; filename="{filename}"',
                "X-Sdx4-Job-Id": job_id,
                "X-Sdx4-Seed": str(snap["options"].get("seed")),
                "Cache-Control": "no-store",
            },
        )

    @app.get("/v1/jobs/{job_id}/result", dependencies=v1, tags=["jobs"], response_class=Response,
             responses={200: {"content": {"image/png": {}}, "description": "the PNG; metadata in its 'sdx4' iTXt chunk"}})
    async def job_result(job_id: str, index: int = 0) -> Response:
        """The upscaled PNG (409 until done). Its `sdx4` text chunk holds every parameter as JSON."""
        return await result_response(job_id, index, "inline")

    @app.delete("/v1/jobs/{job_id}", dependencies=v1, tags=["jobs"])
    async def delete_job(job_id: str) -> JSONResponse:
        """Cancel a queued job (200), ask a running one to stop at its next step (202), forget a finished one (200)."""
        what = manager.cancel(job_id)
        if what is None:
            raise ApiError(404, f"no job {short(job_id)!r} (unknown, deleted or expired)")
        return JSONResponse({"id": job_id, "result": what}, status_code=202 if what == "cancelling" else 200)

    @app.post("/v1/upscale", dependencies=v1, openapi_extra=form_schema, tags=["jobs"], response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the PNG (first image)"}})
    async def upscale_sync(request: Request) -> Response:
        """Queue, wait, and answer with the PNG (the first image; others at /v1/jobs/{id}/result?index=i).
        If the client goes away while waiting, the job is cancelled."""
        image, options, name, loras = await read_submission(request)
        job_id = submit(image, options, name, loras)
        while True:
            since = app.state.changes.event
            snap = manager.snapshot(job_id)
            if snap is None:
                raise ApiError(404, f"job {job_id} was deleted while running")
            if snap["state"] in FINISHED:
                break
            if await request.is_disconnected():
                manager.cancel(job_id, "the client disconnected")
                return Response(status_code=499)
            await app.state.changes.wait(since, SSE_POLL_S)
        if snap["state"] == "failed":
            status = 422 if snap.get("error_kind") == "options" else 500
            raise ApiError(status, snap["error"] or "failed")
        if snap["state"] == "cancelled":
            stopping = manager.stopping
            raise ApiError(503 if stopping else 409, f"job {job_id} was cancelled: {snap['error']}")
        return await result_response(job_id, 0, "attachment")

    @app.post("/v1/estimate", dependencies=v1, tags=["jobs"])
    async def estimate(request: Request) -> dict[str, Any]:
        """How long an upscale of an input_width x input_height input with these options would take and its
        peak memory, before any work (form fields: input_width, input_height and any /v1/upscale option, width
        and height included: the output target) -> {"seconds", "peak_bytes", "output_size": [w, h], "summary"}."""
        try:
            form = await request.form(max_files=0, max_fields=len(FORM_FIELDS) + 2)
        except Exception as e:  # starlette raises HTTPException(400) on a malformed body
            raise ApiError(400, f"malformed form body: {getattr(e, 'detail', e)}") from None
        try:
            fields: dict[str, str] = {}
            for key, value in form.multi_items():
                if key not in FORM_FIELDS and key not in ESTIMATE_SIZE_FIELDS:
                    allowed = ", ".join((*ESTIMATE_SIZE_FIELDS, *FORM_FIELDS))
                    raise ApiError(422, f"unknown field {short(key)!r}; allowed: {allowed}", key)
                if not isinstance(value, str):
                    raise ApiError(422, f"{key}: expected a text field, got a file", key)
                if key in fields:
                    raise ApiError(422, f"{key}: given more than once", key)
                fields[key] = value
        finally:
            await form.close()
        raw_lora = fields.pop(LORA_FIELD, None)
        size, options = parse_estimate(fields, settings)
        if options.noise_level > max_noise_level:
            raise ApiError(422, f"noise_level must be in 0..{max_noise_level}; got {options.noise_level}", "noise_level")
        # Checked as a job's; the estimate leaves out switching to these LoRAs (a UNet load and merge, seconds at
        # full size): whether the job must switch depends on the jobs that run before it.
        parse_lora(raw_lora, options.method)
        from .. import api

        try:
            if options.method != "sd":
                est = await run_in_threadpool(api.estimate_classical, size, options)
            elif estimate_of is None:
                raise ApiError(501, "this service's model gives no time estimates")
            else:
                est = await run_in_threadpool(estimate_of, size, options)
        except api.MemoryBudgetError as e:
            raise ApiError(422, str(e), "max_memory") from None
        except api.OptionsError as e:
            raise ApiError(422, str(e), e.option if e.option in OPTION_NAMES else None) from None
        return est.as_dict()

    @app.get("/v1/info", dependencies=v1, tags=["service"])
    async def info() -> dict[str, Any]:
        """Model, device, dtype, limits, version, option defaults."""
        return service_info(
            model=model_info,
            limits=settings.limits(),
            methods=METHODS,
            choices={k: v[1] for k, v in OPTION_KINDS.items() if v[1]},
            # lora: what a job that sends none merges (every offered LoRA, "none" when none is offered)
            defaults=service_option_defaults() | {LORA_FIELD: lora_choices.default if lora_choices is not None else None},
            api_key_required=settings.api_key is not None,
            queue=manager.status(),
            loras=model_info.get("loras", ()),  # offered: merged at start (`sdx4 serve --lora`), chosen per job
        )

    @app.get("/health", tags=["service"])
    async def health() -> JSONResponse:
        """200 {"status": "ok"} while serving; 503 while shutting down. Needs no API key."""
        status = manager.status()
        ok = not status["stopping"]
        body = {"status": "ok" if ok else "shutting down", "queued": status["queued"], "running": status["running"], "jobs": status["jobs"]}
        return JSONResponse(body, status_code=200 if ok else 503)

    page_headers = {
        "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
    }

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=page_headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


class _PublicPaths:
    """The upscaler as the worker sees it, with the model shown by its Hub id or folder name in every
    result's metadata (job JSON, PNG chunk) rather than its full path (`expose_paths=False`)."""

    def __init__(self, upscaler: Any) -> None:
        self.upscaler = upscaler

    def __getattr__(self, name: str) -> Any:
        return getattr(self.upscaler, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.upscaler(*args, **kwargs)
        meta = getattr(result, "metadata", None)
        if isinstance(meta, dict) and isinstance(meta.get("model"), str) and dataclasses.is_dataclass(result):
            result = dataclasses.replace(result, metadata={**meta, "model": public_model_name(meta["model"])})
        return result


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


# ---- the runner ------------------------------------------------------------------------------------


def serve(upscaler: Any, settings: ServerSettings, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info") -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM.

    On the signal the service stops taking jobs at once (503), cancels the queued ones, stops the
    running one at its next denoising step, lets open requests finish, then deletes the results.
    """
    import signal

    import uvicorn

    if not host_is_address(host) and host not in settings.allowed_hosts:
        settings = dataclasses.replace(settings, allowed_hosts=(*settings.allowed_hosts, host))  # the bound name
    app = create_app(upscaler, settings)
    manager: JobManager = app.state.manager

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Runs as a signal handler in the event loop's thread: hand the work to the loop rather
            # than taking the manager's lock here (the interrupted code may hold it).
            loop = getattr(app.state, "loop", None)
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(manager.begin_shutdown)
            super().handle_exit(sig, frame)

    config = uvicorn_config(app, settings, host, port, log_level)
    # uvicorn re-raises the signal it caught after a graceful shutdown; a no-op SIGTERM handler makes
    # that a clean exit (status 0) instead of death by signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        _Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def host_is_address(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return host == "localhost"


def uvicorn_config(app: Any, settings: ServerSettings, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info") -> Any:
    """uvicorn's settings for the service: its own limits first (idle keep-alive, the size of a request
    head, concurrency), and the h11 protocol of guard.py for what it lacks (connections, head timeout)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        http=guarded_protocol(settings, RateLimitedLog()),
        timeout_keep_alive=max(1, round(settings.keep_alive_s)),
        limit_concurrency=settings.max_connections + 1,  # guard.py closes connections above the limit first
        # asyncio accepts up to `backlog` sockets in one go before any is seen: a larger backlog lets a
        # flood take file descriptors past the limit (EMFILE) before the oldest idle ones are closed.
        backlog=max(16, min(2048, settings.max_connections)),
        h11_max_incomplete_event_size=16 * 1024,  # a request head over 16 KiB: 400
        lifespan="on",
    )
    quiet_access_log()  # after Config: it configures uvicorn's loggers
    return config
