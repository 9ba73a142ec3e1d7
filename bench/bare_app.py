"""The ceiling: a bare Starlette app under uvicorn (uvloop, httptools) answering one small JSON POST.

Run as `python -m bench.bare_app --port P`. It parses the body and answers a small JSON object, so it
does the least work any JSON API must do, and nothing else: no middleware, no logging, no metrics.
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def predict(request: Request) -> Response:
    body = await request.json()
    return JSONResponse({"model": body.get("model"), "output": "The capital of France is Paris."})


async def ready(request: Request) -> Response:
    return JSONResponse({"ready": True})


def create_bare_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/predict", predict, methods=["POST"]),
            Route("/ready", ready, methods=["GET"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="bare Starlette app: the benchmark's ceiling")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_bare_app(),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
