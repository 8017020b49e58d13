# The `imgclf` command line. Subcommand modules are imported inside their handlers, and the help
# for params and the version are looked up only when asked for: `imgclf predict` must start
# without paying for the training stack (torch, lightning, hydra, mlflow), nor for pydantic.

import argparse
import os
import shlex
import sys

from imgclf.errors import ConfigError, run_or_exit
from imgclf.images import MAX_PIXELS  # numpy and Pillow only: the help texts state the default

DESCRIPTION = """\
imgclf trains image classifiers with a reproducible pipeline and serves them.

The pipeline (`dvc repro`, or `make run` on a fresh machine) downloads a data set, normalizes it,
trains a model, exports it to ONNX and evaluates it, tracking every run in MLflow. Its
configuration is composed from conf/ into params.yaml by `imgclf params`."""

EPILOG = """\
Run `imgclf COMMAND --help` for a command's options and examples.
README.md, at the repository's root, explains the pipeline, the configuration and the commands."""

PARAMS_EXAMPLES = """\
examples:
  imgclf params model=cnn train.lr=0.01   a CNN, with a higher learning rate
  imgclf params experiment=mnist_cnn      a recipe from conf/experiment/
  imgclf params --check                   exit 2 if params.yaml has drifted from conf/"""


def params_epilog() -> str:
    """The config groups and choices of conf/ as it is now, then examples."""
    from pathlib import Path

    from imgclf import config

    conf_dir = Path(config.CONF_DIR)
    if not conf_dir.is_dir():
        where = f"no {conf_dir}/ folder in {Path.cwd()}: run imgclf params from the repository's root"
        return f"config groups: {where}\n\n{PARAMS_EXAMPLES}"
    groups = config.group_choices(conf_dir)
    width = max((len(group) for group in groups), default=0)
    lines = [f"  {group:<{width}}  {' '.join(choices)}" for group, choices in groups.items()]
    header = f"config groups in {conf_dir}/ (pick one choice with GROUP=CHOICE):"
    return "\n".join([header, *lines, "", PARAMS_EXAMPLES])


class ParamsHelpAction(argparse.Action):
    """-h for `imgclf params`: lists conf/'s groups, read only when help is asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = params_epilog()
        parser.print_help()
        parser.exit()


class VersionAction(argparse.Action):
    """--version: the installed package's version, looked up only when asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import version

        print(f"imgclf {version('imgclf')}")
        parser.exit()


def cmd_params(args: argparse.Namespace) -> None:
    from imgclf import config

    if args.check:
        overrides = config.params_overrides()
        # The advice keeps the experiment: the same overrides, on conf/ as it is now.
        again = shlex.join(["imgclf", "params", *overrides])
        drift = config.params_drift()
        if drift:
            raise ConfigError(
                f"params.yaml drifted from conf/ ({len(drift)} keys): {'; '.join(drift)}. "
                f"Run `{again}` to recompose it with its overrides"
            )
        recorded = config.recorded_overrides() is not None
        how = "" if recorded else " (written by DVC; the overrides are read from its values)"
        print(f"params.yaml matches conf/ with overrides {overrides}{how}: `{again}` reproduces it")
        return
    config.write_params(args.overrides)
    shown = " ".join(args.overrides) or "defaults"
    print(f"params.yaml composed from conf/ ({shown})")


def cmd_predict(args: argparse.Namespace) -> None:
    from imgclf.serving import predict

    max_pixels = round(args.max_megapixels * 1e6)
    predict.run(args.model, args.files, args.json, args.top_k, args.threads, max_pixels)


def cmd_serve(args: argparse.Namespace) -> None:
    from imgclf.serving import server
    from imgclf.serving.limits import DEFAULT_MAX_BODY_BYTES, MIB

    token = args.token if args.token is not None else os.environ.get("IMGCLF_TOKEN")
    max_body_bytes = DEFAULT_MAX_BODY_BYTES if args.max_body_mb is None else int(args.max_body_mb * MIB)
    server.serve(
        args.model,
        host=args.host,
        port=args.port,
        threads=args.threads,
        token=token or None,
        max_body_bytes=max_body_bytes,
        max_pixels=round(args.max_megapixels * 1e6),
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
    parser = argparse.ArgumentParser(
        prog="imgclf",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=VersionAction, help="print imgclf's version and exit")
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    params = commands.add_parser(
        "params",
        help="compose conf/ into params.yaml, or check it for drift",
        description="Compose conf/ with OVERRIDEs into params.yaml, the one file the pipeline's\n"
        "stages read, and record the overrides in its header; or, with --check, verify that\n"
        "params.yaml is still that composition.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    params.add_argument("-h", "--help", action=ParamsHelpAction, help="show this help message and exit")
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
    predict.add_argument(
        "--max-megapixels",
        type=positive_float,
        default=MAX_PIXELS / 1e6,
        help="largest image, megapixels (default %(default)g; a larger file is an error line)",
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
        "--max-megapixels",
        type=positive_float,
        default=MAX_PIXELS / 1e6,
        help="largest image, megapixels (default %(default)g; 400 above)",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request (off: /metrics counts)")
    serve.set_defaults(handler=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "check", False) and args.overrides:
        raise SystemExit("imgclf: error: --check takes no overrides")
    run_or_exit(lambda: args.handler(args))
