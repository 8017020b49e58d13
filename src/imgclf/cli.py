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

    from imgclf.config import compose

    conf_dir = Path(compose.CONF_DIR)
    if not conf_dir.is_dir():
        where = f"no {conf_dir}/ folder in {Path.cwd()}: run imgclf params from the repository's root"
        return f"config groups: {where}\n\n{PARAMS_EXAMPLES}"
    groups = compose.group_choices(conf_dir)
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
    from imgclf.config import compose as config

    if not args.check:
        config.write_params(args.overrides)
        shown = " ".join(args.overrides) or "defaults"
        print(f"params.yaml composed from conf/ ({shown})")
        return
    if args.overrides:
        raise ConfigError(f"--check takes no overrides, got {shlex.join(args.overrides)}")
    check = config.check_params()
    again = shlex.join(["imgclf", "params", *check.overrides])
    if check.drift:
        keys = f"{len(check.drift)} key{'s' if len(check.drift) > 1 else ''}"
        # Recomposing keeps the experiment (its overrides, on conf/ as it is now); keeping the
        # values records them as the overrides that give them back.
        keep = "" if check.keep is None else shlex.join(["imgclf", "params", *check.keep])
        keep = f", or `{keep}` to keep its values" if keep else ""
        raise ConfigError(
            f"params.yaml drifted from conf/ ({keys}): {'; '.join(check.drift)}. "
            f"Run `{again}` to recompose it with its overrides{keep}"
        )
    overrides = " ".join(check.overrides) or "no overrides"
    if check.recorded:
        print(f"params.yaml matches conf/ with {overrides}: `{again}` reproduces it")
    elif check.overrides:
        print(
            f"params.yaml was written by DVC; it is conf/ with {overrides} (what differs from conf/'s "
            f"defaults): `{again}` reproduces it and records them"
        )
    else:
        print(
            f"params.yaml was written by DVC; it is conf/'s defaults, no overrides: `{again}` reproduces it"
        )


def cmd_predict(args: argparse.Namespace) -> None:
    from imgclf.serving import predict

    max_pixels = round(args.max_megapixels * 1e6)
    predict.run(args.model, args.files, args.json, args.top_k, args.threads, max_pixels)


def cmd_serve(args: argparse.Namespace) -> None:
    from imgclf.serving import server
    from imgclf.serving.limits import DEFAULT_MAX_BODY_BYTES, MIB

    token = args.token if args.token is not None else os.environ.get("IMGCLF_TOKEN")
    max_body_bytes = DEFAULT_MAX_BODY_BYTES if args.max_body_mb is None else int(args.max_body_mb * MIB)
    refresh = server.DEFAULT_REFRESH_S if args.refresh is None else args.refresh
    if not 0 <= refresh < float("inf"):
        raise ConfigError(f"--refresh {args.refresh}: expected seconds, a number >= 0 (0: never)")
    window = server.DEFAULT_MONITOR_WINDOW if args.monitor_window is None else args.monitor_window
    webhook_secret = webhook_secret_of(args, args.model, refresh)
    options = server.ServeOptions(
        host=args.host,
        port=args.port,
        threads=args.threads,
        token=token or None,
        max_body_bytes=max_body_bytes,
        max_pixels=round(args.max_megapixels * 1e6),
        access_log=args.access_log,
        refresh=refresh,
        monitor_window=window,
        **capture_options(args),
        webhook_secret=webhook_secret,
    )
    server.serve(args.model, options)


def webhook_secret_of(args: argparse.Namespace, model: str, refresh: float) -> str | None:
    """--webhook-secret, else $IMGCLF_WEBHOOK_SECRET; the flag only where there is an alias to follow."""
    from imgclf.serving.model import REGISTRY_URI
    from imgclf.serving.webhook import SECRET_ENV

    if args.webhook_secret is None:
        return os.environ.get(SECRET_ENV) or None
    match = REGISTRY_URI.fullmatch(model)
    if not (match and match["alias"] and refresh > 0):
        raise ConfigError(
            "--webhook-secret: webhooks say when an alias moves; it needs --model models:/<name>@<alias> "
            f"and --refresh > 0, got --model {model} --refresh {refresh:g}"
        )
    return args.webhook_secret or None


def cmd_drift(args: argparse.Namespace) -> None:
    from imgclf.serving import replay

    sys.exit(replay.run(args.model, args.paths, args.window, args.plot))


def capture_options(args: argparse.Namespace) -> dict:
    """The ServeOptions of --capture*: one-line errors for values out of range. Without --capture
    nothing of serving.capture is imported."""
    tuned = (args.capture_below, args.capture_max_mb, args.capture_sample or None)
    if args.capture is None:
        if any(value is not None for value in tuned):
            raise ConfigError("--capture-below, --capture-sample and --capture-max-mb need --capture DIR")
        return {"capture_dir": None}
    from imgclf.serving.capture import DEFAULT_BELOW, DEFAULT_MAX_MB

    below = DEFAULT_BELOW if args.capture_below is None else args.capture_below
    if not 0 <= below <= 1:
        raise ConfigError(f"--capture-below {args.capture_below}: expected a probability, 0 to 1")
    if not 0 <= args.capture_sample <= 1:
        raise ConfigError(f"--capture-sample {args.capture_sample}: expected a fraction, 0 to 1")
    max_mb = DEFAULT_MAX_MB if args.capture_max_mb is None else args.capture_max_mb
    return {
        "capture_dir": args.capture,
        "capture_below": below,
        "capture_sample": args.capture_sample,
        "capture_max_bytes": int(max_mb * 1024 * 1024),
    }


def registry_config(overrides: list[str]):
    """params.yaml's config, with `promote.*` OVERRIDEs (or `promote=CHOICE`) applied over it."""
    from imgclf.config.compose import CONF_DIR, compose, params_overrides
    from imgclf.config.operations import load_params, validate
    from imgclf.config.pipeline import PARAMS_FILE
    from imgclf.tracking.store import repo_root

    params = repo_root() / PARAMS_FILE
    if not overrides:
        return load_params(params)
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key != "promote" and not key.startswith("promote."):
            raise ConfigError(
                f"{override}: only the gates can be changed here (promote.KEY=VALUE or promote=CHOICE); "
                "other keys are the pipeline's: `imgclf params` and `dvc repro`"
            )
    conf_dir = repo_root() / CONF_DIR
    composed = compose(params_overrides(conf_dir, params) + overrides, conf_dir)
    return validate(composed)


def append_outputs(path: str | None, text: str) -> None:
    """Append `name=value` lines to FILE ($GITHUB_OUTPUT in a workflow)."""
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


def cmd_register(args: argparse.Namespace) -> None:
    from imgclf.registry import flows
    from imgclf.tracking.store import repo_root

    config = registry_config([])
    version, created = flows.register(config, repo_root())
    name = config.registry.model_name
    if created:
        print(f"registered models/model.onnx as {name} version {version}")
    else:
        print(f"models/model.onnx is already {name} version {version}: nothing to do")
    append_outputs(args.outputs, f"version={version}\ncreated={str(created).lower()}\n")


def cmd_promote(args: argparse.Namespace) -> None:
    from pathlib import Path

    from imgclf.registry import flows
    from imgclf.tracking.store import repo_root

    config = registry_config(args.overrides)
    request = flows.PromoteRequest(
        version=args.version,
        to=args.to,
        expect_champion=args.expect_champion,
        dry_run=args.dry_run,
        reason=args.reason or ("gates passed" if args.to == "challenger" else "promoted"),
        report=Path(args.report) if args.report else None,
    )
    outcome = flows.promote(config, repo_root(), request)
    append_outputs(args.outputs, outcome.outputs())
    if not outcome.passed:
        what = "would not move" if args.dry_run else "did not move"
        raise flows.GateFailed(
            f"{'version ' + outcome.version if outcome.version else 'models/model.onnx'} failed its gates: "
            f"{args.to} {what}"
        )
    print(outcome.message)


def cmd_rollback(args: argparse.Namespace) -> None:
    from imgclf.registry import flows

    message = flows.rollback(registry_config([]), args.to, args.reason)
    print(message)
    if args.report:
        with open(args.report, "a", encoding="utf-8") as f:
            f.write(f"### Rollback\n\n{message}: {args.reason}\n\n")


def cmd_models(args: argparse.Namespace) -> None:
    import json

    from imgclf.registry import report
    from imgclf.registry.client import Registry

    config = registry_config([])
    if args.history:
        rows = Registry(config).history()
        columns = ("at", "actor", "action", "alias", "version", "replaced", "moved", "reason", "ci_run")
    else:
        rows = report.model_rows(config)
        columns = (
            "version",
            "aliases",
            config.promote.metric,
            "latency_ms_p99_b1",
            "gate",
            "commit",
            "registered",
        )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    if not rows:
        what = "no alias has moved yet" if args.history else "no version is registered yet"
        print(f"{config.registry.model_name}: {what} (`imgclf register` after `dvc repro`)")
        return
    print_table(columns, rows)


def cmd_sweep(args: argparse.Namespace) -> None:
    from imgclf.sweep import study as sweep
    from imgclf.tracking.store import repo_root

    request = sweep.Request(args.overrides, args.trials, args.storage, args.study, args.remote)
    sweep.sweep(repo_root(), request)


def print_table(columns: tuple[str, ...], rows: list[dict]) -> None:
    def cell(value) -> str:
        if isinstance(value, list):
            return ",".join(value)
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    def short(column: str, value) -> str:
        return cell(value)[:12] if column == "commit" else cell(value)

    table = [list(columns)] + [[short(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip())


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
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
    serve.add_argument(
        "--refresh",
        type=float,
        metavar="SECONDS",
        help="for MODEL models:/<name>@<alias>: re-resolve the alias every SECONDS and swap to its new "
        "version without a restart (default 30; 0: never); ignored for a file or models:/<name>/<version>",
    )
    serve.add_argument(
        "--webhook-secret",
        metavar="S",
        help="following an alias: also swap as soon as the mlflow server posts an alias event signed "
        "with S to /v1/webhooks/mlflow (`imgclf webhook register`; default: $IMGCLF_WEBHOOK_SECRET)",
    )
    serve.add_argument(
        "--monitor-window",
        type=non_negative_int,
        metavar="N",
        help="drift monitor: test every N images against the model's reference (GET /v1/monitor, "
        "/metrics; default 200; 0: off)",
    )
    # No defaults here: they are serving.capture's, which this module must not import at start.
    serve.add_argument(
        "--capture",
        metavar="DIR",
        help="keep the uploads the model is unsure of in DIR/<predicted label>/, to label on the web "
        "page (off by default: nothing is kept)",
    )
    serve.add_argument(
        "--capture-below",
        type=float,
        metavar="P",
        help="with --capture: keep uploads whose top-1 probability is below P (default 0.6)",
    )
    serve.add_argument(
        "--capture-sample",
        type=float,
        default=0.0,
        metavar="F",
        help="with --capture: also keep a seeded random fraction F of the others (default 0)",
    )
    serve.add_argument(
        "--capture-max-mb",
        type=positive_float,
        metavar="M",
        help="with --capture: DIR's images at most M MiB; the oldest unlabelled go first (default 1024)",
    )
    serve.set_defaults(handler=cmd_serve)
    drift = commands.add_parser(
        "drift",
        help="replay images against a model's drift reference, window by window",
        description="Replay image files, folders or capture manifests (*.jsonl) against MODEL's drift "
        "reference, in windows of N images: a table of p-values per signal, and a PNG of them. "
        "Exit status: 0 no window alarmed, 1 drift, 2 a usage error.",
    )
    drift.add_argument("--model", required=True, help=model_help)
    drift.add_argument(
        "--window", type=positive_int, default=200, metavar="N", help="images per window (default 200)"
    )
    drift.add_argument(
        "--plot", default="drift.png", metavar="PATH", help="the PNG of p-values over windows (drift.png)"
    )
    drift.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or *.jsonl manifests")
    drift.set_defaults(handler=cmd_drift)
    add_registry_commands(commands)
    add_webhook_command(commands)
    add_sweep_command(commands)
    return parser


REGISTRY_EPILOG = """\
The store is MLFLOW_TRACKING_URI, else params.yaml's tracking.uri, else the repo's mlflow.db.
Exit codes: 0 done or nothing to do, 1 a gate failed, 2 usage or configuration error,
3 conflict (another promotion holds the lock, or the champion moved): run again."""


def add_registry_commands(commands) -> None:
    def command(name: str, help: str, description: str):
        return commands.add_parser(
            name,
            help=help,
            description=description,
            epilog=REGISTRY_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    outputs_help = "append name=value lines to FILE (in a workflow: $GITHUB_OUTPUT)"
    report_help = "append the gate table to FILE as markdown (in a workflow: $GITHUB_STEP_SUMMARY)"
    register = command(
        "register",
        "make the evaluated models/model.onnx a version of registry.model_name",
        "Make models/model.onnx, as `dvc repro` last evaluated it, a version of registry.model_name,\n"
        "with what the gates need as tags (metrics, data hashes, commit, parity). The same file\n"
        "(by SHA-256) never makes a second version.",
    )
    register.add_argument("--outputs", metavar="FILE", help=outputs_help + ": version=N, created=true|false")
    register.set_defaults(handler=cmd_register)

    promote = command(
        "promote",
        "gate a version against the champion; on a pass move the aliases",
        "Gate a version against the champion, on the same test split, with the `promote` config\n"
        "group's gates; on a pass point the alias at it (`--to champion`: previous <- the old\n"
        "champion, champion <- the version).\n\n"
        "examples:\n"
        "  imgclf promote --dry-run                      the gates for the evaluated model\n"
        "  imgclf promote --to challenger                gate it, then alias it challenger\n"
        "  imgclf promote --version 4 --expect-champion 3  approve version 4, unless the champion moved\n"
        "  imgclf promote promote.min_improvement=0.01   a stricter gate, this once",
    )
    promote.add_argument(
        "overrides", nargs="*", metavar="OVERRIDE", help="promote.KEY=VALUE or promote=CHOICE"
    )
    promote.add_argument(
        "--version",
        metavar="N",
        help="the version to gate (default: the one registered from models/model.onnx)",
    )
    promote.add_argument(
        "--to", choices=("challenger", "champion"), default="champion", help="the alias to move"
    )
    promote.add_argument(
        "--expect-champion",
        metavar="V",
        help="exit 3 unless the champion is still version V (`none`: there is none): an approval "
        "given for one champion never silently replaces a newer one",
    )
    promote.add_argument("--dry-run", action="store_true", help="print the gates; change nothing")
    promote.add_argument("--reason", metavar="TEXT", help="why, for the history")
    promote.add_argument("--report", metavar="FILE", help=report_help)
    promote.add_argument(
        "--outputs", metavar="FILE", help=outputs_help + ": version, champion, passed, approve"
    )
    promote.set_defaults(handler=cmd_promote)

    rollback = command(
        "rollback",
        "point champion back at previous (or a version)",
        "Point `champion` back at `previous` (or at version N) and `previous` at the champion it\n"
        "replaces: a second rollback undoes the first.",
    )
    rollback.add_argument("--to", default="previous", metavar="previous|N", help="default: previous")
    rollback.add_argument("--reason", required=True, metavar="TEXT", help="why, for the history (required)")
    rollback.add_argument("--report", metavar="FILE", help="append a line to FILE (markdown)")
    rollback.set_defaults(handler=cmd_rollback)

    models = command(
        "models",
        "list the registered versions, or the history of alias moves",
        "The versions of registry.model_name with their aliases, metric, latency, gate result and\n"
        "commit; with --history, who moved which alias, when and why.",
    )
    models.add_argument("--json", action="store_true", help="one JSON object per line")
    models.add_argument("--history", action="store_true", help="the alias moves, oldest first")
    models.set_defaults(handler=cmd_models)


WEBHOOK_DESCRIPTION = """\
The webhooks of the mlflow server (MLFLOW_TRACKING_URI, else params.yaml's tracking.uri) that
post alias moves to `imgclf serve --webhook-secret`, which then swaps at once instead of at its
next --refresh. The secret: $IMGCLF_WEBHOOK_SECRET (or --secret), the same value the server has.
A URL has at most one webhook: registering it again updates it.

examples:
  imgclf webhook register --url https://serve.example.com/v1/webhooks/mlflow
  imgclf webhook test --url https://serve.example.com/v1/webhooks/mlflow   a delivery, now
  imgclf webhook list
  imgclf webhook delete --url https://serve.example.com/v1/webhooks/mlflow"""


def cmd_webhook(args: argparse.Namespace) -> None:
    from imgclf.registry.webhooks import Webhooks
    from imgclf.serving.webhook import SECRET_ENV

    webhooks = Webhooks()
    if args.action == "register":
        secret = args.secret if args.secret is not None else os.environ.get(SECRET_ENV)
        done = webhooks.register(args.url, secret, args.name)
        what = "registered" if done.created else "updated"
        print(f"{what} webhook {done.name} ({done.webhook_id}): alias moves -> {done.url}")
    elif args.action == "list":
        print_webhooks(webhooks, args.json)
    elif args.action == "delete":
        count = webhooks.delete(args.url)
        print(f"deleted {count} webhook{'s' * (count != 1)} with the URL {args.url}")
    else:
        print(webhooks.test(args.url))


def print_webhooks(webhooks, as_json: bool) -> None:
    import json

    rows = webhooks.rows()
    if as_json:
        for row in rows:
            print(json.dumps(row))
    elif rows:
        print_table(tuple(rows[0]), rows)
    else:
        print(f"no webhooks on {webhooks.store}")


def add_webhook_command(commands) -> None:
    webhook = commands.add_parser(
        "webhook",
        help="register the webhook that tells `imgclf serve` at once that an alias moved",
        description=WEBHOOK_DESCRIPTION,
        epilog="Exit codes: 0 done, 1 the server failed or did not answer, 2 usage or configuration error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = webhook.add_subparsers(dest="action", required=True, metavar="ACTION")
    url_help = "where the mlflow server posts: imgclf serve's http(s)://HOST:PORT/v1/webhooks/mlflow"
    register = actions.add_parser("register", help="create the webhook for URL, or update it")
    register.add_argument("--url", required=True, help=url_help)
    register.add_argument("--name", help="the webhook's name (default: imgclf-<host>-<port>)")
    register.add_argument("--secret", help="default: $IMGCLF_WEBHOOK_SECRET (a flag shows in `ps`)")
    listing = actions.add_parser("list", help="the server's webhooks")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    delete = actions.add_parser("delete", help="delete the webhook of URL")
    delete.add_argument("--url", required=True, help=url_help)
    test = actions.add_parser("test", help="have the server deliver an example alias event to URL now")
    test.add_argument("--url", required=True, help=url_help)
    webhook.set_defaults(handler=cmd_webhook)


SWEEP_DESCRIPTION = """\
An Optuna study over the `sweep` config group's search space (conf/sweep/). Each trial is one
`dvc exp run --temp` named sweep-<study>-<trial>, scored on the validation split
(metrics/train.json), its MLflow run tagged optuna.study and optuna.trial, and pushed with
`dvc exp push` to the git remote. Start as many workers as you like, on one machine or several:
they share the study through --storage.

examples:
  imgclf sweep --trials 10                                one machine: optuna.db beside mlflow.db
  imgclf sweep train.max_epochs=10                        every trial with 10 epochs
  imgclf sweep sweep=cnn model=cnn                        another search space (conf/sweep/cnn.yaml)
  imgclf sweep --storage postgresql+psycopg2://me@db/optuna --study digits-v2   one worker of many"""

SWEEP_EPILOG = """\
Exit codes: 0 done, 1 no trial of this worker completed or an experiment could not be pushed,
2 usage or configuration error (a bad search space names its key), 3 the storage was busy
creating the study for other workers: run again. Ctrl-C stops the running experiment and tells
the study it failed."""


def add_sweep_command(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="an Optuna study whose trials are DVC experiments; many workers may share it",
        description=SWEEP_DESCRIPTION,
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="for every trial (train.max_epochs=10), or the search (sweep=CHOICE, sweep.KEY=VALUE)",
    )
    sweep.add_argument(
        "--trials", type=positive_int, metavar="N", help="trials this worker runs (default: sweep.n_trials)"
    )
    sweep.add_argument(
        "--storage",
        metavar="URL",
        help="the study's database: sqlite:///PATH (default: <repo>/optuna.db) for one machine, "
        "postgresql+psycopg2://USER@HOST/DB for several (the password in PGPASSWORD or ~/.pgpass)",
    )
    sweep.add_argument("--study", metavar="NAME", help="default: sweep.study, else <data.name>-<model.name>")
    sweep.add_argument(
        "--remote", metavar="NAME", help="git remote to push each experiment to (default: origin, if any)"
    )
    sweep.set_defaults(handler=cmd_sweep)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    run_or_exit(lambda: args.handler(args))
