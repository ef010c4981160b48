"""The HTTP side of ``gptforge serve`` (FastAPI on uvicorn): OpenAI's ``/v1/completions``
(a JSON answer, or server-sent events with ``"stream": true``), ``/v1/models`` and ``/health``."""

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gptforge.launcher.serving.protocol import (RequestError, chunk, completion, completion_id,
                                                parse_completion)
from gptforge.launcher.serving.worker import Pending


def build_app(worker, tok, *, model_name: str, context: int) -> FastAPI:
    app = FastAPI(title="gptforge serve")

    def refuse(err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "batches": worker.batches,
                "requests_generated": worker.rows, "requests_waiting": worker.queue.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                             "owned_by": "gptforge"}]}

    @app.post("/v1/completions")
    async def completions(http: Request):
        try:
            try:
                body = json.loads(await http.body())
            except ValueError as err:
                raise RequestError("body", f"the request body is not JSON ({err})") from None
            request = parse_completion(body)
            if request.model and request.model != model_name:
                raise RequestError("model", f"the model {request.model!r} does not exist here "
                                            f"(GET /v1/models: {model_name!r})", status=404)
            ids = tok.encode(request.prompt)
            if len(ids) + request.max_tokens > context:
                raise RequestError("max_tokens", f"the prompt's {len(ids)} tokens + max_tokens "
                                                 f"{request.max_tokens} exceed the model's "
                                                 f"context of {context} tokens")
        except RequestError as err:
            return refuse(err)
        pending = Pending(request, ids, tok, asyncio.get_running_loop())
        worker.submit(pending)
        cid = completion_id()
        if request.stream:
            return StreamingResponse(_sse(pending, cid, model_name),
                                     media_type="text/event-stream")
        text = []
        while True:
            event = await pending.events.get()
            if event[0] == "delta":
                text.append(event[1])
            elif event[0] == "error":
                return JSONResponse({"error": {"message": event[1], "type": "server_error",
                                               "param": None, "code": None}},
                                    status_code=event[2])
            else:
                _, reason, prompt_tokens, completion_tokens = event
                return completion(cid, model_name, "".join(text), reason, prompt_tokens,
                                  completion_tokens)

    return app


async def _sse(pending: Pending, cid: str, model_name: str):
    """Server-sent events: one chunk per piece of text, the finish reason, then [DONE]."""
    while True:
        event = await pending.events.get()
        if event[0] == "delta":
            yield f"data: {json.dumps(chunk(cid, model_name, event[1], None))}\n\n"
        elif event[0] == "error":
            error = {"error": {"message": event[1], "type": "server_error"}}
            yield f"data: {json.dumps(error)}\n\n"
            break
        else:
            yield f"data: {json.dumps(chunk(cid, model_name, '', event[1]))}\n\n"
            break
    yield "data: [DONE]\n\n"
