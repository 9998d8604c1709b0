"""`twotower serve`: an HTTP JSON server over an exported model (FastAPI + uvicorn).

    POST /recommend  {"history": [id, ...], "k": 10, "exclude": [id, ...]}
                     or {"histories": [[id, ...], ...], "k": 10}   -> top-k ids with scores
                     a history item may be {"item_id": id, "timestamp": s, "action": a}
                     (what a model trained with model.user.time_gaps / actions reads)
    POST /items      {"items": [{"item_id": ..., "title": ..., <other text fields>}]}
                     -> embedded by the item tower, searchable at once (no restart)
    GET  /health     status, item count, model mode, the served export's id and swap count

The server follows its export folder: a newer export written there (`twotower export --out` or
`update --export`) is loaded in the background and swapped in (`trainers.hot_reload`).

Bad input is a 4xx with a message, never a 5xx: a body over serving.max_body_bytes is refused before
it is read (413), pydantic bounds sizes and k (422), unknown ids are
named (422), an id already in the catalogue is a conflict (409). Handlers are plain functions, so
FastAPI runs them on its thread pool: searches run in parallel, appends one at a time."""
# No `from __future__ import annotations`: FastAPI must resolve the handlers' body types, which are
# classes local to `request_models`.
import math
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Optional, Union

import faiss
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from twotower.configs import Config
from twotower.configs.serving import ServingConfig
from twotower.serving.body_limit import BodySizeLimit
from twotower.serving.export_format import load_exported
from twotower.serving.hot_reload import ExportWatcher
from twotower.serving.recommender import DuplicateItemsError, Recommender, UnknownItemsError, split_events

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=512)]
"An item id as sent: a non-empty string (a JSON number is read as its decimal string)."
STRICT = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


def request_models(limits: ServingConfig) -> tuple[type[BaseModel], type[BaseModel]]:
    """The request bodies, with the bounds of `limits` (classes are built per app for that)."""
    class Event(BaseModel):
        model_config = STRICT
        item_id: ItemId
        timestamp: Optional[float] = None
        "Epoch seconds (model.user.time_gaps)."
        action: Optional[Annotated[str, StringConstraints(max_length=512)]] = None
        "A value of the data's action column (model.user.actions)."

    History = Annotated[list[Union[ItemId, Event]], Field(min_length=1, max_length=limits.max_history)]

    class RecommendRequest(BaseModel):
        model_config = STRICT
        history: Optional[History] = None
        "One history, oldest first, newest last."
        histories: Optional[Annotated[list[History], Field(min_length=1, max_length=limits.max_batch)]] = None
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

    return RecommendRequest, ItemsRequest


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


def build_app(recommender: Recommender, limits: ServingConfig, watch: str | Path | None = None) -> FastAPI:
    """`watch`: the export folder to follow (`serving.reload_interval_s`): a newer export written
    there is loaded in the background and swapped in without dropping requests."""
    RecommendRequest, ItemsRequest = request_models(limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = ExportWatcher(recommender, watch, limits.reload_interval_s) if watch and limits.reload_interval_s else None
        if watcher:
            watcher.start()
        yield
        if watcher:
            watcher.stop()

    app = FastAPI(title="twotower", description="Two-tower recommendations from an exported model.", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)  # 413 before a large body is read

    @app.exception_handler(UnknownItemsError)
    def unknown_items(request: Request, exc: UnknownItemsError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc), "unknown": exc.item_ids})

    @app.exception_handler(DuplicateItemsError)
    def duplicate_items(request: Request, exc: DuplicateItemsError) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc), "existing": exc.item_ids})

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
        return {"added": len(records), "items": recommender.add_items(records)}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "items": len(recommender.items), "mode": recommender.mode,
                "index": recommender.items.index_type, "export_id": recommender.export_id, "swaps": recommender.swaps}

    return app


def serve(cfg: Config, model_dir: str | Path, host: str, port: int, limits: ServingConfig) -> None:
    """Load the export once, then serve until interrupted (SIGINT / SIGTERM stop it cleanly)."""
    if limits.torch_threads:
        torch.set_num_threads(limits.torch_threads)
    if limits.search_threads:
        faiss.omp_set_num_threads(limits.search_threads)
    app = build_app(Recommender(load_exported(model_dir, cfg)), limits, watch=model_dir)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
