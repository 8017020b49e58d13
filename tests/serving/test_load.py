"""A bounded load test on 127.0.0.1: 4 concurrent clients x 200 requests against the real server.

No timing is asserted (the machine is shared); what must hold under concurrency is that every
request succeeds and every answer is the one the same image gets alone, so the shared session
and the thread pool mix nothing up.
"""

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.serving.conftest import grey_png

CLIENTS = 4
REQUESTS = 200


def test_concurrent_clients_get_consistent_answers(base_url, digits_splits):
    images = digits_splits["test"][0]
    # Each client posts its own digits, so answers crossing between requests would show.
    uploads = [[grey_png(images[(c * 7 + i) % len(images)]) for i in range(10)] for c in range(CLIENTS)]
    with httpx.Client(base_url=base_url, timeout=30) as client:
        expected = {
            png: client.post("/v1/predict", files={"file": ("d.png", png, "image/png")}).json()
            for pngs in uploads
            for png in pngs
        }

    def run_client(pngs: list[bytes]) -> list[str]:
        problems = []
        with httpx.Client(base_url=base_url, timeout=30) as client:
            for i in range(REQUESTS):
                png = pngs[i % len(pngs)]
                response = client.post("/v1/predict", files={"file": ("d.png", png, "image/png")})
                if response.status_code != 200:
                    problems.append(f"request {i}: {response.status_code} {response.text[:200]}")
                elif response.json() != expected[png]:
                    problems.append(f"request {i}: answer differs from the same image alone")
        return problems

    with ThreadPoolExecutor(CLIENTS) as pool:
        problems = [p for result in pool.map(run_client, uploads) for p in result]
    assert problems == []
