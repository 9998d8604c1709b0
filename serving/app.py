"""`twotower serve`: an HTTP JSON server over an exported model (FastAPI + uvicorn).

    POST /recommend  {"history": [id, ...], "k": 10, "exclude": [id, ...]}
                     or {"histories": [[id, ...], ...], "k": 10}   -> top-k ids with scores
                     a history item may be {"item_id": id, "timestamp": s, "action": a}
                     (what a model trained with model.user.time_gaps / actions reads)
    POST /items      {"items": [{"item_id": ..., "title": ..., <other text fields>}]}
                     -> embedded by the item tower, searchable at once (no restart)
    POST /events     {"events": [{"user_id": ..., "item_id": ..., "timestamp": s, "event": e}, ...]}
                     -> appended to the event stream (needs stream.url)
    GET  /health     status, item count, model mode, the served export's id and swap count,
                     the stream's url and the items-log offset the server has caught up to

The server follows its export folder: a newer export written there (`twotower export --out` or
`update --export`) is loaded in the background and swapped in (`serving.hot_reload`).

With an event stream (`stream.url`), what the server accepts is in the stream before it answers:
events are appended, a new item is claimed there first (an id another writer claimed is a 409),
and the server serves every item of the stream's items log, at start-up and as other servers add
them (`serving.stream_items`), so a restart loses none and replicas converge.

Bad input is a 4xx with a message, never a 5xx: a body over serving.max_body_bytes is refused before
it is read (413), pydantic bounds sizes and k (422), unknown ids are named (422), an id already in
the catalogue, or claimed in the stream by another server, is a conflict (409), and so is POST
/events on a server without a stream; a stream that fails to answer is a 503. Handlers are plain
functions, so FastAPI runs them on its thread pool: searches run in parallel, appends one at a time."""
# No `from __future__ import annotations`: FastAPI must resolve the handlers' body types, which are
# classes local to `request_models`.
import logging
import math
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import faiss
import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from twotower.configs import Config
from twotower.configs.serving import ServingConfig
from twotower.serving.body_limit import BodySizeLimit
from twotower.serving.export_format import load_exported
from twotower.serving.hot_reload import ExportWatcher
from twotower.serving.recommender import (
    ClaimedItemsError,
    DuplicateItemsError,
    Recommender,
    UnknownItemsError,
    split_events,
)
from twotower.serving.stream_items import ItemFollower
from twotower.streaming import Stream, StreamError, open_stream

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=512)]
"An item id as sent: a non-empty string (a JSON number is read as its decimal string)."
STRICT = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
NO_STREAM = "this server has no event stream: start it with stream.url=PATH or stream.url=redis://HOST:PORT/DB"
log = logging.getLogger("twotower.serve")


def request_models(limits: ServingConfig) -> tuple[type[BaseModel], type[BaseModel], type[BaseModel]]:
    """The request bodies, with the bounds of `limits` (classes are built per app for that)."""
    class Event(BaseModel):
        model_config = STRICT
        item_id: ItemId
        timestamp: float | None = None
        "Epoch seconds (model.user.time_gaps)."
        action: Annotated[str, StringConstraints(max_length=512)] | None = None
        "A value of the data's action column (model.user.actions)."

    History = Annotated[list[ItemId | Event], Field(min_length=1, max_length=limits.max_history)]

    class RecommendRequest(BaseModel):
        model_config = STRICT
        history: History | None = None
        "One history, oldest first, newest last."
        histories: Annotated[list[History], Field(min_length=1, max_length=limits.max_batch)] | None = None
        "A batch of histories (instead of `history`)."
        k: int = Field(10, ge=1, le=limits.max_k)
        exclude: Annotated[list[ItemId], Field(max_length=limits.max_history)] = []
        "Items never to recommend (besides each history's own)."

        @model_validator(mode="after")
        def one_of_history_or_histories(self):
            if (self.history is None) == (self.histories is None):
                raise ValueError("send exactly one of 'history' (a list of item ids) or 'histories' (a list of such lists)")
            return self

    class NewItem(BaseModel):
        model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)
        __pydantic_extra__: dict[str, Annotated[str, StringConstraints(max_length=10_000)]]
        item_id: ItemId

    class ItemsRequest(BaseModel):
        model_config = STRICT
        items: Annotated[list[NewItem], Field(min_length=1, max_length=limits.max_new_items)]

    class UserEvent(BaseModel):
        model_config = STRICT
        user_id: Annotated[str, StringConstraints(min_length=1, max_length=512)]
        item_id: ItemId
        timestamp: Annotated[float, Field(allow_inf_nan=False)] | None = None
        "Epoch seconds; the server's time when left out."
        event: Annotated[str, StringConstraints(max_length=512)] | None = None
        "What the user did (a value of the data's action column)."

    class EventsRequest(BaseModel):
        model_config = STRICT
        events: Annotated[list[UserEvent], Field(min_length=1, max_length=limits.max_events)]

    return RecommendRequest, ItemsRequest, EventsRequest


def _renderable(value):
    """`value` (as `jsonable_encoder` leaves it) with what a UTF-8 JSON reply cannot hold written out:
    non-finite floats as "inf" or "nan", lone surrogates escaped ("\\ud800")."""
    if isinstance(value, dict):
        return {_renderable(k): _renderable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_renderable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _ranked(row: list[tuple[str, float]]) -> dict:
    return {"items": [{"item_id": item_id, "score": score} for item_id, score in row]}


def build_app(recommender: Recommender, limits: ServingConfig, watch: str | Path | None = None,
              stream: Stream | None = None, poll_interval_s: float = 0.5) -> FastAPI:
    """`watch`: the export folder to follow (`serving.reload_interval_s`): a newer export written
    there is loaded in the background and swapped in without dropping requests. `stream`: the
    event stream that accepted events and items go to; the app's start-up adds the items of its
    items log and then follows it every `poll_interval_s` (`stream.poll_interval_s`)."""
    RecommendRequest, ItemsRequest, EventsRequest = request_models(limits)
    follower = ItemFollower(recommender, stream, poll_interval_s) if stream else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if follower:  # before the first request: items added live before a restart are served at once
            started = time.monotonic()
            added = follower.catch_up()
            log.info("stream %s: %d live item(s) from its items log added in %.1f s (offset %s)",
                     stream.url, added, time.monotonic() - started, follower.offset)
            follower.start()
        watcher = ExportWatcher(recommender, watch, limits.reload_interval_s) if watch and limits.reload_interval_s else None
        if watcher:
            watcher.start()
        yield
        if watcher:
            watcher.stop()
        if follower:
            follower.stop()

    app = FastAPI(title="twotower", description="Two-tower recommendations from an exported model.", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)  # 413 before a large body is read

    @app.exception_handler(UnknownItemsError)
    def unknown_items(request: Request, exc: UnknownItemsError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc), "unknown": exc.item_ids})

    @app.exception_handler(DuplicateItemsError)
    def duplicate_items(request: Request, exc: DuplicateItemsError) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc), "existing": exc.item_ids})

    @app.exception_handler(ClaimedItemsError)
    def claimed_items(request: Request, exc: ClaimedItemsError) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc), "existing": exc.item_ids, "added": exc.added})

    @app.exception_handler(StreamError)
    def stream_failed(request: Request, exc: StreamError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": f"the event stream failed: {exc}"})

    @app.exception_handler(ValueError)
    def bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each error's input, which a UTF-8 JSON reply cannot always hold
        # (a lone surrogate, the inf that 1e400 parses to): rendering it failed, and the client was told
        # the encoder's problem ("surrogates not allowed") instead of its own.
        return JSONResponse(status_code=422, content={"detail": _renderable(jsonable_encoder(exc.errors()))})

    def search_threads_here() -> None:
        # FAISS's OpenMP thread count is per thread: the one `serve` sets at start-up does not reach the
        # worker threads that run the handlers, where each search would use every core and start an
        # OpenMP team of its own (torch re-applies its setting in each thread itself).
        if limits.search_threads:
            faiss.omp_set_num_threads(limits.search_threads)

    @app.post("/recommend")
    def recommend(body: RecommendRequest) -> dict:
        search_threads_here()
        histories = [body.history] if body.history is not None else body.histories
        ids, times, actions = split_events([[e if isinstance(e, str) else e.model_dump() for e in h] for h in histories])
        rows = recommender.recommend(ids, body.k, body.exclude, times, actions)
        return _ranked(rows[0]) if body.history is not None else {"results": [_ranked(row) for row in rows]}

    @app.post("/items")
    def add_items(body: ItemsRequest) -> dict:
        search_threads_here()
        records = [item.model_dump() for item in body.items]
        return {"added": len(records), "items": recommender.add_items(records, stream.claim_items if stream else None)}

    @app.post("/events")
    def add_events(body: EventsRequest) -> dict:
        if stream is None:
            raise HTTPException(409, NO_STREAM)  # the request is fine; this server is not set up for it
        unknown = recommender.unknown([e.item_id for e in body.events])
        if unknown:
            raise UnknownItemsError(unknown)
        now = time.time()
        events = [{"user_id": e.user_id, "item_id": e.item_id, "timestamp": now if e.timestamp is None else e.timestamp,
                   **({} if e.event is None else {"event": e.event})} for e in body.events]
        return {"appended": len(events), "offsets": stream.append_events(events)}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "items": len(recommender.items), "mode": recommender.mode,
                "index": recommender.items.index_type, "export_id": recommender.export_id, "swaps": recommender.swaps,
                "stream": stream.url if stream else None, "items_offset": follower.offset if follower else None}

    return app


def serve(cfg: Config, model_dir: str | Path, host: str, port: int, limits: ServingConfig) -> None:
    """Load the export once, open the event stream if `stream.url` is set, then serve until
    interrupted (SIGINT / SIGTERM stop it cleanly)."""
    if limits.torch_threads:
        torch.set_num_threads(limits.torch_threads)
    if limits.search_threads:
        faiss.omp_set_num_threads(limits.search_threads)
    stream = open_stream(cfg.stream.url, cfg.stream.segment_bytes) if cfg.stream.url else None  # first: a bad one fails fast
    try:
        app = build_app(Recommender(load_exported(model_dir, cfg)), limits, watch=model_dir, stream=stream,
                        poll_interval_s=cfg.stream.poll_interval_s)
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
    finally:
        if stream:
            stream.close()
