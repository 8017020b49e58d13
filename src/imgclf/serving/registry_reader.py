"""Reading the MLflow Model Registry: which version an alias names, a version's record and files,
and the runs of an experiment.

Importing mlflow takes seconds (any import of it loads its tracing, GenAI and flavour modules),
which `imgclf predict`, `imgclf models` and `imgclf promote --dry-run` would pay for a few
requests. So an `mlflow server` is read over MLflow's documented REST API (`/api/2.0/mlflow/...`,
and `/api/2.0/mlflow-artifacts/...` for proxied artifacts) with the standard library, with the
credentials and retry settings MLflow's client reads from the environment. Anything else is read
through MLflow's own client: a sqlite store, artifacts kept elsewhere than behind the server, and
a server that needs what only MLflow's client does (AWS SigV4, an auth plugin, TLS certificates,
workspaces, a credentials file). Both readers answer with the same plain records.
"""

import base64
import json
import os
import posixpath
import random
import re
import shutil
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from imgclf.errors import ImgclfError

# Set any of these and only MLflow's client knows how to talk to the server.
MLFLOW_CLIENT_ONLY = (
    "MLFLOW_TRACKING_AWS_SIGV4",
    "MLFLOW_TRACKING_AUTH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_WORKSPACE",
)
TRANSIENT = {408, 429, 500, 502, 503, 504}  # retried, as MLflow's client does
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
PAGE = 1000


class RegistryReadError(ImgclfError):
    """The store did not answer, or answered with an error (`code`: MLflow's error code, such as
    RESOURCE_DOES_NOT_EXIST, or "" when there was no answer)."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class VersionRecord:
    """A registered model version, as the registry reports it."""

    name: str
    version: str
    source: str
    run_id: str
    tags: dict[str, str]
    creation_timestamp: int  # milliseconds since the epoch


def registry_reader(store: str) -> "RestReader | MlflowReader":
    """A reader for the tracking URI `store`: REST for a plain `mlflow server`, else MLflow's client."""
    plain = not any(os.environ.get(key) for key in MLFLOW_CLIENT_ONLY)
    credentials_file = Path("~/.mlflow/credentials").expanduser()
    if store.startswith(("http://", "https://")) and plain and not credentials_file.is_file():
        return RestReader(store)
    return MlflowReader(store)


class RestReader:
    """An `mlflow server` read over its REST API."""

    def __init__(self, store: str):
        import ssl  # here, with urllib.request: `imgclf predict` on a file needs neither (25 ms)

        self.store = store.rstrip("/")
        self.headers = {"User-Agent": "imgclf"}
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if user and password:
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {basic}"
        elif token:
            self.headers["Authorization"] = f"Bearer {token}"
        # The CA bundle that `requests`, and so MLflow's client, would trust.
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        self.tls = ssl.create_default_context(cafile=bundle) if bundle else None
        self.timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or 120)
        self.retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") or 7)
        self.backoff = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR") or 2)
        self.jitter = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER") or 1.0)

    # --- the registry ---------------------------------------------------------------------

    def aliases(self, name: str) -> dict[str, str] | None:
        """alias -> version of registered model `name`; None if there is no such model."""
        try:
            model = self._api("GET", "registered-models/get", {"name": name})["registered_model"]
        except RegistryReadError as error:
            if error.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return {entry["alias"]: str(entry["version"]) for entry in model.get("aliases", [])}

    def version(self, name: str, version: str) -> VersionRecord:
        answer = self._api("GET", "model-versions/get", {"name": name, "version": version})
        return _version_record(answer["model_version"])

    def version_by_alias(self, name: str, alias: str) -> VersionRecord:
        answer = self._api("GET", "registered-models/alias", {"name": name, "alias": alias})
        return _version_record(answer["model_version"])

    def search_versions(self, filter_string: str) -> list[VersionRecord]:
        found, token = [], None
        while True:
            query = {"filter": filter_string, "max_results": PAGE, **({"page_token": token} if token else {})}
            answer = self._api("GET", "model-versions/search", query)
            found += [_version_record(v) for v in answer.get("model_versions", [])]
            token = answer.get("next_page_token")
            if not token:
                return found

    def download_version(self, name: str, version: str, folder: Path) -> Path:
        """The version's files, downloaded into `folder` (which is returned)."""
        uri = self._api("GET", "model-versions/get-download-uri", {"name": name, "version": version})
        return self._download(uri["artifact_uri"], folder)

    def download_run_file(self, run_id: str, path: str, folder: Path) -> Path | None:
        """The file `path` of run `run_id`'s artifacts, downloaded into `folder`; None if absent."""
        run = self._api("GET", "runs/get", {"run_id": run_id})["run"]
        proxied = self._proxied(run["info"].get("artifact_uri", ""))
        if proxied is None:
            return MlflowReader(self.store).download_run_file(run_id, path, folder)
        base, root = proxied
        parent, name = posixpath.split(posixpath.join(root, path))
        if (name, False) not in self._listing(base, parent):
            return None
        return self._fetch(f"{base}/{urllib.parse.quote(posixpath.join(parent, name))}", folder / name)

    # --- the runs of an experiment (the registry's history) --------------------------------

    def experiment_id(self, name: str) -> str | None:
        try:
            answer = self._api("GET", "experiments/get-by-name", {"experiment_name": name})
        except RegistryReadError as error:
            if error.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return str(answer["experiment"]["experiment_id"])

    def run_tags(self, experiment_id: str) -> list[dict[str, str]]:
        """The tags of each active run of the experiment, oldest first."""
        found, token = [], None
        while True:
            body = {"experiment_ids": [experiment_id], "order_by": ["attributes.start_time ASC"]}
            body |= {"max_results": PAGE, **({"page_token": token} if token else {})}
            answer = self._api("POST", "runs/search", body)
            found += [_tags(run.get("data", {})) for run in answer.get("runs", [])]
            token = answer.get("next_page_token")
            if not token:
                return found

    # --- HTTP ------------------------------------------------------------------------------

    def _api(self, method: str, endpoint: str, payload: dict) -> dict:
        url = f"{self.store}/api/2.0/mlflow/{endpoint}"
        if method == "GET":
            return self._json(f"{url}?{urllib.parse.urlencode(payload)}")
        return self._json(url, json.dumps(payload).encode())

    def _json(self, url: str, body: bytes | None = None) -> dict:
        """The JSON answer to a GET of `url`, or to a POST of `body` (JSON) to it."""
        import urllib.request

        headers = self.headers | ({"Content-Type": "application/json"} if body else {})
        with self._open(urllib.request.Request(url, body, headers)) as answer:
            text = answer.read()
        try:
            return json.loads(text or b"{}")
        except ValueError:
            raise RegistryReadError(f"API request to {url}: the answer is not JSON: {text[:200]!r}") from None

    def _open(self, request):
        """The answer to `request` (a urllib Request), retried as MLflow's client retries;
        RegistryReadError otherwise."""
        import urllib.error
        import urllib.request

        failures = 0
        while True:
            try:
                return urllib.request.urlopen(request, timeout=self.timeout, context=self.tls)
            except urllib.error.HTTPError as error:
                if error.code not in TRANSIENT or failures == self.retries:
                    raise _http_error(request.full_url, error) from None
                error.close()
            except OSError as error:  # refused, reset, timed out, a name that does not resolve
                if failures == self.retries:
                    reason = getattr(error, "reason", None) or error
                    retried = f" (after {self.retries} retries)" if self.retries else ""
                    message = f"API request to {request.full_url} failed: {reason}{retried}"
                    raise RegistryReadError(message) from None
            failures += 1
            # urllib3's schedule, which MLflow's client follows: at once, then 2, 4, 8 ... × the factor
            if failures > 1:
                time.sleep(min(120.0, self.backoff * 2 ** (failures - 1) + random.random() * self.jitter))

    def _download(self, artifact_uri: str, folder: Path) -> Path:
        proxied = self._proxied(artifact_uri)
        if proxied is None:  # not behind this server: MLflow's client knows every artifact store
            return MlflowReader(self.store).download(artifact_uri, folder)
        base, root = proxied
        folder.mkdir(parents=True, exist_ok=True)
        self._download_tree(base, root, folder)
        if not any(folder.iterdir()):  # nothing listed: the URI names a file, not a folder
            self._fetch(f"{base}/{urllib.parse.quote(root)}", folder / posixpath.basename(root))
        return folder

    def _download_tree(self, base: str, path: str, folder: Path) -> None:
        for name, is_dir in self._listing(base, path):
            if is_dir:
                self._download_tree(base, posixpath.join(path, name), folder / name)
            else:
                self._fetch(f"{base}/{urllib.parse.quote(posixpath.join(path, name))}", folder / name)

    def _listing(self, base: str, path: str) -> list[tuple[str, bool]]:
        """(name, is a folder) of each entry of the artifact folder `path`."""
        listing = self._json(f"{base}?{urllib.parse.urlencode({'path': path})}")
        entries = []
        for entry in listing.get("files", []):
            name = posixpath.basename(entry["path"])
            if name in ("", ".", ".."):
                raise RegistryReadError(f"the artifacts of {path!r} list a bad name: {entry['path']!r}")
            entries.append((name, bool(entry.get("is_dir"))))
        return entries

    def _fetch(self, url: str, target: Path) -> Path:
        import urllib.request

        target.parent.mkdir(parents=True, exist_ok=True)
        request = urllib.request.Request(url, headers=self.headers)
        try:
            with self._open(request) as answer, target.open("wb") as out:
                shutil.copyfileobj(answer, out, 1 << 20)
                expected = answer.headers.get("Content-Length")
        except OSError as error:  # the connection broke mid-file, or the disk is full
            raise RegistryReadError(f"the download of {url} failed: {error}") from None
        size = target.stat().st_size
        if expected is not None and size != int(expected):
            raise RegistryReadError(f"the download of {url} ended early: {size} of {expected} bytes")
        return target

    def _proxied(self, artifact_uri: str) -> tuple[str, str] | None:
        """(the server's artifact endpoint, the path under it) for an `mlflow-artifacts:` URI
        (artifacts proxied by the server), resolved as MLflow's client resolves it; None for any
        other artifact store."""
        parsed = urllib.parse.urlparse(artifact_uri)
        if parsed.scheme != "mlflow-artifacts":
            return None
        store = urllib.parse.urlparse(self.store)
        endpoint = re.sub("/+", "/", f"{store.path}{ARTIFACTS}")
        return f"{store.scheme}://{parsed.netloc or store.netloc}{endpoint}", parsed.path.strip("/")


def _http_error(url: str, error) -> RegistryReadError:
    """MLflow's error answer ({"error_code", "message"}) in one line, as MLflow's client words it."""
    body = error.read().decode("utf-8", "replace")
    error.close()
    try:
        answer = json.loads(body)
        code, message = answer["error_code"], answer.get("message", "")
    except (ValueError, KeyError, TypeError):
        code = "RESOURCE_DOES_NOT_EXIST" if error.code == 404 else ""
        return RegistryReadError(
            f"API request to {url} failed with error code {error.code}: {' '.join(body.split())[:300]}", code
        )
    return RegistryReadError(f"{code}: {message}", code)


def _version_record(answer: dict) -> VersionRecord:
    return VersionRecord(
        name=answer["name"],
        version=str(answer["version"]),
        source=answer.get("source", ""),
        run_id=answer.get("run_id", ""),
        tags=_tags(answer),
        creation_timestamp=int(answer.get("creation_timestamp", 0)),
    )


def _tags(answer: dict) -> dict[str, str]:
    return {tag["key"]: tag.get("value", "") for tag in answer.get("tags", [])}


class MlflowReader:
    """Any store MLflow's client can read (a sqlite file; a server with special authentication)."""

    def __init__(self, store: str):
        # Progress bars would garble `imgclf predict --json` output on a terminal.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.store = store
        self.client = MlflowClient(tracking_uri=store, registry_uri=store)
        self.MlflowException = MlflowException

    def aliases(self, name: str) -> dict[str, str] | None:
        try:
            model = self._call(self.client.get_registered_model, name)
        except RegistryReadError as error:
            if error.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return {alias: str(version) for alias, version in model.aliases.items()}

    def version(self, name: str, version: str) -> VersionRecord:
        return self._record(self._call(self.client.get_model_version, name, version))

    def version_by_alias(self, name: str, alias: str) -> VersionRecord:
        return self._record(self._call(self.client.get_model_version_by_alias, name, alias))

    def search_versions(self, filter_string: str) -> list[VersionRecord]:
        return [self._record(v) for v in self._call(self.client.search_model_versions, filter_string)]

    def download_version(self, name: str, version: str, folder: Path) -> Path:
        # The version's own location, not models:/<name>/<version>: MLflow resolves that form
        # against the process-wide registry URI, whatever store it is given.
        uri = self._call(self.client.get_model_version_download_uri, name, version)
        return self.download(uri, folder)

    def download(self, artifact_uri: str, folder: Path) -> Path:
        import mlflow.artifacts

        folder.mkdir(parents=True, exist_ok=True)
        local = self._call(
            mlflow.artifacts.download_artifacts,
            artifact_uri=artifact_uri,
            dst_path=str(folder),
            tracking_uri=self.store,
        )
        return Path(local)

    def download_run_file(self, run_id: str, path: str, folder: Path) -> Path | None:
        import mlflow.artifacts

        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(folder), tracking_uri=self.store
            )
        except (self.MlflowException, OSError):
            return None
        return Path(local)

    def experiment_id(self, name: str) -> str | None:
        experiment = self._call(self.client.get_experiment_by_name, name)
        return None if experiment is None else experiment.experiment_id

    def run_tags(self, experiment_id: str) -> list[dict[str, str]]:
        runs = self._call(
            self.client.search_runs,
            [experiment_id],
            order_by=["attributes.start_time ASC"],
            max_results=50000,
        )
        return [dict(run.data.tags) for run in runs]

    def _call(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except self.MlflowException as error:
            message = " ".join(str(getattr(error, "message", None) or error).split())
            raise RegistryReadError(message, str(error.error_code)) from None
        except OSError as error:
            raise RegistryReadError(" ".join(str(error).split())) from None

    @staticmethod
    def _record(version) -> VersionRecord:
        return VersionRecord(
            name=version.name,
            version=str(version.version),
            source=version.source or "",
            run_id=version.run_id or "",
            tags=dict(version.tags),
            creation_timestamp=int(version.creation_timestamp or 0),
        )
