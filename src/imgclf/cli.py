"""The `imgclf` command line.

Subcommand modules are imported inside their handlers: `imgclf predict` must start without
paying for the training stack (torch, lightning, hydra, mlflow).
"""

import argparse
import os
import sys

from imgclf.errors import ConfigError, run_or_exit


def cmd_params(args: argparse.Namespace) -> None:
    from imgclf import config

    if args.check:
        drift = config.params_drift()
        if drift:
            raise ConfigError(
                f"params.yaml drifted from conf/ ({len(drift)} keys): {'; '.join(drift)}. "
                "Run `imgclf params` to recompose it"
            )
        print("params.yaml matches conf/")
        return
    config.write_params(args.overrides)
    shown = " ".join(args.overrides) or "defaults"
    print(f"params.yaml composed from conf/ ({shown})")


def cmd_predict(args: argparse.Namespace) -> None:
    from imgclf.serving import predict

    predict.run(args.model, args.files, args.json, args.top_k, args.threads)


def cmd_serve(args: argparse.Namespace) -> None:
    from imgclf.serving import server
    from imgclf.serving.limits import DEFAULT_MAX_BODY_BYTES, MIB
    from imgclf.serving.model import DEFAULT_MAX_PIXELS

    token = args.token if args.token is not None else os.environ.get("IMGCLF_TOKEN")
    max_body_bytes = DEFAULT_MAX_BODY_BYTES if args.max_body_mb is None else int(args.max_body_mb * MIB)
    max_pixels = DEFAULT_MAX_PIXELS if args.max_megapixels is None else int(args.max_megapixels * 1e6)
    server.serve(
        args.model,
        host=args.host,
        port=args.port,
        threads=args.threads,
        token=token or None,
        max_body_bytes=max_body_bytes,
        max_pixels=max_pixels,
        access_log=args.access_log,
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgclf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    params = commands.add_parser("params", help="compose conf/ into params.yaml, or check it for drift")
    params.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="Hydra overrides, e.g. model=cnn train.lr=0.01",
    )
    params.add_argument("--check", action="store_true", help="exit 2 if params.yaml differs from conf/")
    params.set_defaults(handler=cmd_params)

    model_help = "an .onnx file, or a registry URI: models:/<name>@<alias> or models:/<name>/<version>"
    predict = commands.add_parser("predict", help="classify image files and folders")
    predict.add_argument("--model", required=True, help=model_help)
    predict.add_argument("files", nargs="+", metavar="FILE", help="image files or folders (walked)")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument("--top-k", type=positive_int, metavar="K", help="only the K best classes")
    predict.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)"
    )
    predict.set_defaults(handler=cmd_predict)

    serve = commands.add_parser("serve", help="HTTP API and web page for a model")
    serve.add_argument("--model", required=True, help=model_help)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ONNX Runtime intra-op threads per prediction (default 1: requests run in parallel)",
    )
    serve.add_argument(
        "--token", help="require `Authorization: Bearer TOKEN` on /v1/* (default: $IMGCLF_TOKEN)"
    )
    # No default here: it is the server's (serving.limits), which this module must not import.
    serve.add_argument(
        "--max-body-mb", type=positive_float, help="largest request body, MiB (default 10; 413 above)"
    )
    serve.add_argument(
        "--max-megapixels", type=positive_float, help="largest image, megapixels (default 40; 400 above)"
    )
    serve.add_argument("--access-log", action="store_true", help="log every request (off: /metrics counts)")
    serve.set_defaults(handler=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "check", False) and args.overrides:
        raise SystemExit("imgclf: error: --check takes no overrides")
    run_or_exit(lambda: args.handler(args))
