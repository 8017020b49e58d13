"""`imgclf serve`: load the model, then run the app under uvicorn (one process).

One process is enough: predictions run in the thread pool and ONNX Runtime releases the GIL, so
requests are classified in parallel on one shared session. uvicorn picks uvloop and httptools
when installed (`uvicorn[standard]`), which roughly halves the per-request overhead.
"""

from imgclf.images import MAX_PIXELS
from imgclf.serving.app import create_app
from imgclf.serving.limits import DEFAULT_MAX_BODY_BYTES
from imgclf.serving.model import ServedModel


def serve(
    model_uri: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int = 1,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_pixels: int = MAX_PIXELS,
    access_log: bool = False,
) -> None:
    import uvicorn

    model = ServedModel.load(model_uri, threads=threads, max_pixels=max_pixels)
    app = create_app(model, token=token, max_body_bytes=max_body_bytes)
    auth = "bearer token required on /v1/*" if token else "no token"
    url = f"http://{host}:{port}/"
    print(f"imgclf: serving {model.name} version {model.version} on {url} ({auth})", flush=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        ws="none",  # no websocket routes: skip loading a websocket implementation
        access_log=access_log,
        log_level="info",
        server_header=False,
    )
