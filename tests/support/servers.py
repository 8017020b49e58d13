"""Real servers on free 127.0.0.1 ports, each in its own process group and stopped as a whole:
`mlflow server` (what `make server` and `make team-server` run), a private PostgreSQL cluster and
moto's S3."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.support.repo import VENV_BIN, SetupError, run


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
                raise SetupError(
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
        raise SetupError(f"no PostgreSQL server under {POSTGRES_BIN}: run `make server-deps`")
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
