"""`imgclf serve`: load the model, then run the app under uvicorn (one process).

One process: a small request to a fast model is classified on the event loop (serving.app),
anything larger in the thread pool, where ONNX Runtime releases the GIL, so requests are
classified in parallel on one shared session. One process also keeps /metrics and the model
follower whole: workers would each count their own requests and poll the registry on their own
(and two workers measured no faster than one on two cores, beside the clients). uvicorn picks
uvloop and httptools when installed (`uvicorn[standard]`), which roughly halves the per-request
overhead.

Served from an alias (`models:/<name>@<alias>`), the model follows it: a thread re-resolves the
alias every `refresh` seconds and swaps in a new version (serving.follow); it stops with the server.
With a webhook secret, MLflow's signed alias events wake it at once (serving.webhook).
"""

import contextlib
import copy
from dataclasses import dataclass

from imgclf.images import MAX_PIXELS
from imgclf.serving.app import create_app
from imgclf.serving.follow import LiveModel
from imgclf.serving.limits import DEFAULT_MAX_BODY_BYTES
from imgclf.serving.monitoring import DEFAULT_WINDOW as DEFAULT_MONITOR_WINDOW
from imgclf.serving.webhook import WEBHOOK_PATH

DEFAULT_REFRESH_S = 30.0  # `imgclf serve --refresh` states it in its help: keep them equal


@dataclass(frozen=True)
class ServeOptions:
    """What `imgclf serve` is asked for, past the model: its flags, with their defaults."""

    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 1
    token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = MAX_PIXELS
    access_log: bool = False
    refresh: float = DEFAULT_REFRESH_S
    monitor_window: int = DEFAULT_MONITOR_WINDOW  # images per drift window; 0: off
    capture_dir: str | None = None  # None: nothing kept (users' images are theirs)
    capture_below: float | None = None  # None: serving.capture's default (imported only with a DIR)
    capture_sample: float = 0.0
    capture_max_bytes: int | None = None  # None: serving.capture's default
    webhook_secret: str | None = None  # following an alias: POST /v1/webhooks/mlflow, signed with it


def serve(model_uri: str, options: ServeOptions = ServeOptions()) -> None:
    import uvicorn

    live = LiveModel.load(
        model_uri,
        options.refresh,
        threads=options.threads,
        max_pixels=options.max_pixels,
        webhook_secret=options.webhook_secret,
    )
    capture = None
    if options.capture_dir is not None:
        from imgclf.serving.capture import Capture

        tuned = {"below": options.capture_below, "max_bytes": options.capture_max_bytes}
        capture = Capture(
            options.capture_dir,
            sample=options.capture_sample,
            **{name: value for name, value in tuned.items() if value is not None},
        )
    app = create_app(
        live,
        token=options.token,
        max_body_bytes=options.max_body_bytes,
        capture=capture,
        monitor_window=options.monitor_window,
    )
    auth = "bearer token required on /v1/* and /v2/* (not /v2/health/*)" if options.token else "no token"
    url = f"http://{options.host}:{options.port}/"
    model = live.model
    following = f", following {model_uri} every {options.refresh:g} s" if live.following else ""
    if live.following and live.webhook_secret:
        following += f" and on MLflow's webhooks at {url.rstrip('/')}{WEBHOOK_PATH}"
    print(f"imgclf: serving {model.name} version {model.version} on {url} ({auth}{following})", flush=True)
    # uvicorn's own logging, plus the swaps and refusals of serving.follow, in its format.
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["imgclf.serving"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    if capture is not None:
        print(
            f"imgclf: keeping uploads below {capture.below:g} top-1 probability"
            f" (and a {capture.sample:g} sample) in {capture.root}, at most "
            f"{capture.max_bytes / 1024**2:g} MiB",
            flush=True,
        )
    # the poller runs while uvicorn does, and stops when it returns; the capture writer drains
    with live, contextlib.closing(capture) if capture is not None else contextlib.nullcontext():
        uvicorn.run(
            app,
            host=options.host,
            port=options.port,
            ws="none",  # no websocket routes: skip loading a websocket implementation
            access_log=options.access_log,
            log_level="info",
            log_config=log_config,
            server_header=False,
        )
