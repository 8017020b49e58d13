"""The `imgclf` command line."""

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "check", False) and args.overrides:
        raise SystemExit("imgclf: error: --check takes no overrides")
    run_or_exit(lambda: args.handler(args))
