"""Shared helpers for the benchmarks: a clean copy of the repo, commands, timing, results."""

import contextlib
import json
import operator
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
VENV_BIN = Path(sys.prefix) / "bin"  # the interpreter running the benchmark, e.g. .venv/bin
# Cached pipeline outputs and local state: a copy must start without them (they are gitignored
# anyway; dvc.lock is dropped too so that `dvc repro` in the copy really starts from scratch).
# metrics/ and plots/*.csv are in git, as in a clone: experiments compare against them.
EXCLUDED = {"data", "models", "mlflow.db", "mlartifacts", "mlruns", ".venv"}
EXCLUDED_FILES = {"dvc.lock"}
GIT_IDENTITY = ["-c", "user.name=bench", "-c", "user.email=bench@localhost"]
GIT_IDENTITY += ["-c", "commit.gpgsign=false"]
OPS = {"<=": operator.le, ">=": operator.ge}


class BenchError(Exception):
    """A benchmark cannot run; the message says why (printed without a traceback)."""


def repo_files(root: Path = ROOT) -> list[str]:
    """Tracked and untracked-but-not-ignored files of the work tree that exist on disk."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], root)
    files = [name for name in listed.split("\0") if name]
    return [
        name
        for name in files
        if name.split("/")[0] not in EXCLUDED
        and name not in EXCLUDED_FILES
        and not name.startswith("bench/results/")
        and (root / name).is_file()
    ]


def copy_repo(dest: Path, root: Path = ROOT) -> Path:
    """The work tree's files (`repo_files`) copied into `dest`, committed in a fresh git repo.

    What a clean clone of this work tree would hold, uncommitted changes included; the tests'
    end-to-end runs use it too.
    """
    for name in repo_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    git_commit(dest, "copy of imgclf")
    return dest


@contextlib.contextmanager
def repo_copy(keep: bool = False) -> Iterator[Path]:
    """A temporary `copy_repo`, removed afterwards unless `keep`."""
    folder = Path(tempfile.mkdtemp(prefix="imgclf-bench-"))
    try:
        yield copy_repo(folder)
    finally:
        if keep:
            print(f"kept the copy at {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SERVER_START_S = 120  # it answers /health after 15-30 s on 2 cores; more under a busy test run


@contextlib.contextmanager
def server_group(
    name: str, command: list[str], cwd: Path, env: dict, health: str, log: Path
) -> Iterator[None]:
    """`command` in its own process group until it answers `health`; the whole group is stopped after."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(health, timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(
                    f"{name} did not answer {health}:\n{log.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.3)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def mlflow_server(
    folder: Path,
    backend_uri: str | None = None,
    artifacts_uri: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """A real `mlflow server` on a free 127.0.0.1 port, artifacts proxied into `folder` (or
    `artifacts_uri`, e.g. s3://bucket/path, with `env` holding what the server needs to reach it);
    yields its URL.

    What a team runs (`make server`, `make team-server`): one worker, no job runner (half the
    memory), in its own process group, which is killed as a whole afterwards.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend_uri = backend_uri or f"sqlite:///{folder / 'mlflow.db'}"
    artifacts_uri = artifacts_uri or (folder / "artifacts").as_uri()
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | (env or {})
    server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    server_env["PATH"] = f"{VENV_BIN}{os.pathsep}{server_env.get('PATH', '')}"
    cmd = [
        str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts_uri,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    with server_group(f"mlflow server on {url}", cmd, folder, server_env, f"{url}/health", log):
        yield url


POSTGRES_BIN = "/usr/lib/postgresql"  # Debian's layout: /usr/lib/postgresql/<major>/bin


@contextlib.contextmanager
def postgres_server(database: str = "imgclf") -> Iterator[str]:
    """A private PostgreSQL cluster on a free 127.0.0.1 port, removed afterwards; yields the URL of
    `database` for SQLAlchemy (postgresql+psycopg2://, the driver MLflow and Optuna take).

    Debian's server (`make server-deps`), started without systemd. initdb and pg_ctl refuse to
    run as root: as root they run as the `postgres` user, in a folder of its own under /tmp.
    """
    versions = sorted(Path(POSTGRES_BIN).glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise BenchError(f"no PostgreSQL server under {POSTGRES_BIN}: run `make server-deps`")
    bindir = versions[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="imgclf-postgres-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={folder} -c fsync=off"
    try:
        run(
            [*as_owner, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "imgclf", "--no-sync"],
            folder,
        )
        run(
            [
                *as_owner,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(folder / "log"),
                "-w",
                "start",
            ],
            folder,
        )
        if database != "postgres":
            run(
                [
                    *as_owner,
                    str(bindir / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    "imgclf",
                    database,
                ],
                folder,
            )
        yield f"postgresql+psycopg2://imgclf@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run(
            [*as_owner, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            cwd=folder, capture_output=True,
        )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_server(*buckets: str) -> Iterator[dict[str, str]]:
    """moto's S3 server on a free 127.0.0.1 port with `buckets` created; yields the environment a
    client needs (endpoint and the dummy credentials moto requires), as real S3 would take it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    try:
        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL_S3"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()


def git_commit(folder: Path, message: str) -> None:
    if not (folder / ".git").is_dir():
        run(["git", "init", "--quiet", "--initial-branch=main"], folder)
    run(["git", *GIT_IDENTITY, "add", "--all"], folder)
    run(["git", *GIT_IDENTITY, "commit", "--quiet", "--allow-empty", "-m", message], folder)


def pipeline_env(copy: Path) -> dict[str, str]:
    """The venv's tools first on PATH and the copy's sources on PYTHONPATH."""
    env = dict(os.environ)
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "PYTHONHOME"):
        env.pop(name, None)  # the copy must track into its own store, not an outer one
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(copy / "src")
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command; return its stdout, or raise BenchError with its output on failure."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stdout + done.stderr).strip()[-3000:]
        raise BenchError(f"`{' '.join(cmd)}` failed with exit code {done.returncode}:\n{tail}")
    return done.stdout


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one successful run of `cmd`."""
    started = time.perf_counter()
    run(cmd, cwd, env)
    return time.perf_counter() - started


def timed_lines(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[float, list[tuple[float, str]]]:
    """Wall seconds of `cmd`, and each output line with the second it arrived (from the start)."""
    started = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))
    seconds = time.perf_counter() - started
    if process.returncode:
        tail = "\n".join(line for _, line in lines)[-3000:]
        raise BenchError(f"`{' '.join(cmd)}` failed with exit code {process.returncode}:\n{tail}")
    return seconds, lines


def row(
    metric: str, value: float, unit: str = "", op: str | None = None, target: float | None = None
) -> dict:
    """One result line; with `op` and `target` it also says whether the target is met."""
    ok = None if op is None else bool(OPS[op](value, target))
    return {"metric": metric, "value": value, "unit": unit, "op": op, "target": target, "ok": ok}


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of result rows; a "bench" column first when the rows have one."""
    table = []
    for r in rows:
        target = f"{r['op']} {r['target']:g}" if r["op"] else ""
        status = {None: "", True: "ok", False: "MISSED"}[r["ok"]]
        value = r["value"]
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
        cells = [r["metric"], f"{value} {r['unit']}".strip(), target, status]
        table.append([r["bench"], *cells] if "bench" in r else cells)
    if not table:
        return ""
    widths = [max(len(cells[i]) for cells in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in table]
    return "\n".join(line.rstrip() for line in lines)


def write_result(name: str, rows: list[dict], details: dict | None = None) -> Path:
    """Print the rows and write bench/results/<name>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    result = {
        "name": name,
        "rows": rows,
        "details": details or {},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "python": sys.version.split()[0],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_rows(rows))
    print(f"-> {path.relative_to(ROOT)}")
    return path


def main_guard(main) -> None:
    """Run `main`; a BenchError ends the script with its message and exit code 1."""
    try:
        main()
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def add_override_option(parser) -> None:
    """`--set OVERRIDE` (repeatable): an extra `imgclf params` override for a quick run."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="extra `imgclf params` override for a quick run, e.g. train.max_epochs=2",
    )
