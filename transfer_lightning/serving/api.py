"""The LitAPI of ``serve``, in a module of its own: LitServe's worker processes import it by name, and only
the server imports it, so LitServe (the [serve] extra) is needed only to serve."""

from __future__ import annotations

import argparse
import json

import litserve as ls
import torch
from fastapi.responses import JSONResponse

from transfer_lightning.serving.requests import Rejected, answer, decode_all, load_model, read_images


class ClassifierAPI(ls.LitAPI):
    """Decodes each request's images, classifies the images of a whole batch of requests in one
    forward pass, and answers each request with its own images' predictions, or its own 4xx."""

    def __init__(self, args: argparse.Namespace, **kwargs) -> None:
        super().__init__(**kwargs)
        self.args = args

    def setup(self, device: str) -> None:
        self.model = load_model(self.args.ckpt_path, self.args.model, device)

    def decode_request(self, request):
        images = read_images(request, int(self.args.max_image_mb * 2**20))
        if isinstance(images, Rejected):
            return images
        prepared = decode_all(self.model, images, int(self.args.max_megapixels * 1e6))
        return prepared if isinstance(prepared, Rejected) else ([name for name, _ in images], prepared)

    def predict(self, inputs):
        # LitServe hands a list of requests when it batches (max_batch_size > 1), else one request.
        batched = self.args.max_batch_size > 1
        requests = inputs if batched else [inputs]
        images = [image for r in requests if not isinstance(r, Rejected) for image in r[1]]
        model_outputs = self.model.run(torch.stack(images)) if images else None
        outputs, start = [], 0
        for r in requests:
            if isinstance(r, Rejected):
                outputs.append(r)
            else:
                names, prepared = r
                mine = model_outputs.rows(start, start + len(prepared))
                start += len(prepared)
                outputs.append(answer(self.model, mine, names, self.args.top_k))
        return outputs if batched else outputs[0]

    def encode_response(self, output):
        # A rejected request gets its own 4xx here: an exception would fail every request of the batch.
        if isinstance(output, Rejected):
            return JSONResponse(status_code=output.status, content={"error": output.message})
        return {"predictions": output}


class RejectBadJSON:
    """ASGI middleware: a JSON body that does not parse gets a 400 with the parser's message, before
    LitServe's handler parses it (which would answer 500). Other requests pass through unchanged."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers") or [])
        if scope["type"] != "http" or scope["method"] != "POST" or b"json" not in headers.get(b"content-type", b""):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            json.loads(body)
        except ValueError as error:
            response = JSONResponse(status_code=400, content={"error": f"the body is not valid JSON ({error})."})
            await response(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
