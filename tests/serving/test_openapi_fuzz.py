"""Schemathesis against the running server's own OpenAPI spec: generated requests, valid ones and
deliberately invalid ones, never get a 5xx, and the answers match the documented schemas.

Bounded and repeatable: a fixed number of derandomized examples per operation and mode. The
operations are listed here (schemathesis' lazy pytest fixture loader does not run on this
pytest), and a test checks that the list covers every operation in the spec.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

MAX_EXAMPLES = 50
OPERATIONS = ["GET /health", "GET /v1/model", "GET /v1/monitor", "POST /v1/predict"]
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# Requests to generate: the GETs take no input, so only valid requests exist for them.
RUNS = [("GET /health", POSITIVE), ("GET /v1/model", POSITIVE), ("GET /v1/monitor", POSITIVE)]
RUNS += [("POST /v1/predict", POSITIVE), ("POST /v1/predict", NEGATIVE)]
# Labelling: fuzzed on a server that captures every upload (the predictions fuzzed above included).
LABELLING = ["GET /v1/captures", "GET /v1/captures/{sha256}", "POST /v1/feedback"]
OPERATIONS += LABELLING
RUNS += [(label, mode) for label in LABELLING for mode in (POSITIVE, NEGATIVE)]
# The Open Inference Protocol (serving.v2). Its GETs take only path strings, which any string
# satisfies: no invalid request exists for them.
V2_GETS = ["GET /v2", "GET /v2/health/live", "GET /v2/health/ready"]
V2_GETS += ["GET /v2/models/{name}", "GET /v2/models/{name}/ready"]
V2_GETS += [label.replace("{name}", "{name}/versions/{version}") for label in V2_GETS[-2:]]
V2_INFER = ["POST /v2/models/{name}/infer", "POST /v2/models/{name}/versions/{version}/infer"]
OPERATIONS += V2_GETS + V2_INFER
RUNS += [(label, POSITIVE) for label in V2_GETS]
RUNS += [(label, mode) for label in V2_INFER for mode in (POSITIVE, NEGATIVE)]


@pytest.fixture(scope="module")
def api_schema(served_model, tmp_path_factory):
    from imgclf.serving.app import create_app
    from imgclf.serving.capture import Capture
    from tests.serving.conftest import running_server

    capture = Capture(tmp_path_factory.mktemp("captures"), below=1.01)
    with running_server(create_app(served_model, capture=capture)) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")
    capture.close()


def test_every_operation_is_fuzzed(api_schema):
    labels = sorted(result.ok().label for result in api_schema.get_all_operations())
    assert labels == sorted(OPERATIONS)


@pytest.mark.parametrize("label, mode", RUNS, ids=[f"{label} {mode.value}" for label, mode in RUNS])
def test_generated_requests_get_no_server_error(api_schema, label, mode):
    operation = api_schema.find_operation_by_label(label)
    seen_statuses = set()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        # A schema-valid upload is any bytes; most are not images, and 400 is the right answer.
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        seen_statuses.add(response.status_code)

    check()
    assert seen_statuses and max(seen_statuses) < 500
