"""monitoring/alerts.yml: promtool's checks and unit tests, every metric it reads exists on
/metrics, and (slow) a real Prometheus scraping a real `imgclf serve` fires the drift alert."""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from imgclf.serving.app import create_app
from imgclf.serving.model import ServedModel
from tests.conftest import REPO, tool_env
from tests.serving.conftest import grey_png, running_server

RULES = REPO / "monitoring" / "alerts.yml"
PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")


def prometheus_or_skip() -> None:
    """Skip (fail on CI) where Debian's prometheus (promtool and the server) is not installed."""
    if not (PROMTOOL and PROMETHEUS):
        why = "Prometheus is not installed (`make server-deps`)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def test_rules_pass_promtool_check_and_unit_tests():
    prometheus_or_skip()
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULES.with_name("alerts_test.yml"))]):
        done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_metric_the_rules_read_is_on_metrics(monitored_model_path):
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    read = {name for rule in rules for name in re.findall(r"\bimgclf_\w+", rule["expr"])}
    model = ServedModel.load(str(monitored_model_path), threads=1)
    with running_server(create_app(model)) as url:
        text = httpx.get(f"{url}/metrics").text
    exposed = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    exposed |= {
        f"{family.name}_total" for family in text_string_to_metric_families(text) if family.type == "counter"
    }
    assert read <= exposed, read - exposed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def process_group(args: list[str], **options):
    """A process in its own group, stopped with everything it started."""
    process = subprocess.Popen(args, start_new_session=True, **options)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {seconds} s")


@pytest.mark.slow
def test_a_real_prometheus_fires_the_drift_alert_on_shifted_traffic(
    monitored_model_path, digits_splits, tmp_path
):
    prometheus_or_skip()
    serve_port, prometheus_port = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "imgclf", "static_configs": [{"targets": [f"127.0.0.1:{serve_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    serve = [
        "imgclf",
        "serve",
        "--model",
        str(monitored_model_path),
        "--port",
        str(serve_port),
        "--monitor-window",
        "50",
    ]
    prometheus = [
        PROMETHEUS,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
    ]
    log = (tmp_path / "logs.txt").open("w")
    with (
        process_group(serve, env=tool_env(REPO), stdout=log, stderr=subprocess.STDOUT),
        process_group(prometheus, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT),
    ):
        server, api = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{prometheus_port}/api/v1"
        wait_for(f"{server}/health")
        wait_for(f"http://127.0.0.1:{prometheus_port}/-/ready")
        inverted = 255 - digits_splits["test"][0][:100]
        for start in range(0, len(inverted), 25):
            files = [
                ("file", (f"{i}.png", grey_png(p), "image/png"))
                for i, p in enumerate(inverted[start : start + 25])
            ]
            assert httpx.post(f"{server}/v1/predict", files=files, timeout=30).status_code == 200
        deadline, firing = time.monotonic() + 60, []
        while time.monotonic() < deadline and not firing:
            alerts = httpx.get(f"{api}/alerts", timeout=5).json()["data"]["alerts"]
            firing = [
                a for a in alerts if a["labels"]["alertname"] == "ImgclfDrift" and a["state"] == "firing"
            ]
            time.sleep(0.5)
        log.flush()
        assert firing, (tmp_path / "logs.txt").read_text()[-3000:]
        assert "brightness" in {alert["labels"]["signal"] for alert in firing}
        targets = httpx.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
        assert targets[0]["health"] == "up"
