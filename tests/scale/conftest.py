"""A shared tracking server as a team runs one (`make team-server`): `mlflow server` on PostgreSQL
(a database of its own in the session's private cluster), artifacts proxied into an S3 bucket
(moto), started once per module on free ports and stopped by process group afterwards.

Clients get nothing but MLFLOW_TRACKING_URI (`client_env`): no database URL, no S3 credentials.
"""

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import tool_env

BUCKET = "imgclf-team"
ARTIFACTS_PREFIX = "mlartifacts"


@dataclass(frozen=True)
class TeamServer:
    url: str  # what clients set MLFLOW_TRACKING_URI to
    database: str  # the server's backend store, postgresql+psycopg2://...
    s3: dict[str, str]  # the server's S3 environment: endpoint and credentials

    def query(self, sql: str, **params) -> list:
        """Rows of `sql` on the server's database, read directly (not through MLflow)."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.database)
        try:
            with engine.connect() as connection:
                return list(connection.execute(sqlalchemy.text(sql), params))
        finally:
            engine.dispose()

    def objects(self, prefix: str = "") -> list[str]:
        """The keys in the bucket under `prefix`, read directly (not through MLflow)."""
        pages = self._bucket().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self._bucket().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def _bucket(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3["AWS_ENDPOINT_URL_S3"],
            aws_access_key_id=self.s3["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.s3["AWS_SECRET_ACCESS_KEY"],
            region_name=self.s3["AWS_DEFAULT_REGION"],
        )


def create_database(cluster_url: str, name: str) -> str:
    """`CREATE DATABASE name` in the cluster of `cluster_url` (what `createdb` does); its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(cluster_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return cluster_url.rsplit("/", 1)[0] + f"/{name}"


def client_env(root: Path, url: str) -> dict[str, str]:
    """A team member's environment: `tool_env`, no AWS variables, MLFLOW_TRACKING_URI=url."""
    env = {k: v for k, v in tool_env(root).items() if not k.startswith("AWS_")}
    return env | {"MLFLOW_TRACKING_URI": url}


@pytest.fixture(scope="module")
def team_server(postgres_url, tmp_path_factory) -> TeamServer:
    from tests.support.servers import mlflow_server, s3_server

    database = create_database(postgres_url, f"mlflow_{uuid.uuid4().hex[:8]}")
    with (
        s3_server(BUCKET) as s3,
        mlflow_server(
            tmp_path_factory.mktemp("team-server"),
            backend_uri=database,
            artifacts_uri=f"s3://{BUCKET}/{ARTIFACTS_PREFIX}",
            env=s3,
        ) as url,
    ):
        yield TeamServer(url, database, s3)
