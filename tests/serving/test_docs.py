"""/docs works offline: every file the page loads comes from the server itself (Swagger UI from the
pinned npm package, `make install`); and /openapi.json declares the bearer token as a scheme."""

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest


class Links(HTMLParser):
    """Every src and href of a page, in order."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def page_links(html: str) -> list[str]:
    parser = Links()
    parser.feed(html)
    return parser.urls


def test_docs_load_every_file_from_the_server(client, base_url):
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    links = page_links(page.text)
    assert len(links) >= 3  # the script, the stylesheet, the icon
    # The spec Swagger UI fetches is named in its script, not in a src or href.
    links += re.findall(r"url: '([^']+)'", page.text)
    for link in links:
        url = urlsplit(urljoin(f"{base_url}/docs", link))
        assert f"{url.scheme}://{url.netloc}" == base_url, f"{link} is not served by this server"
        assert client.get(link).status_code == 200, link
    assert "://" not in page.text  # nothing external, not even in the script's settings


def test_redoc_is_not_served(client):
    # Its page loads scripts and fonts from CDNs; /docs is the one documentation page.
    assert client.get("/redoc").status_code == 404


def bearer_schemes(spec: dict) -> list[str]:
    schemes = spec["components"]["securitySchemes"]
    return [name for name, s in schemes.items() if s["type"] == "http" and s["scheme"] == "bearer"]


def test_the_token_is_a_bearer_scheme_on_every_v1_operation(client):
    spec = client.get("/openapi.json").json()
    [name] = bearer_schemes(spec)
    assert "--token" in spec["components"]["securitySchemes"][name]["description"]
    operations = [(path, op) for path, ops in spec["paths"].items() for op in ops.values()]
    assert any(path == "/v1/predict" for path, _ in operations)
    for path, operation in operations:
        if path.startswith("/v1/"):
            # The scheme, or nothing: a server started without --token takes requests without one.
            assert sorted(operation["security"], key=len) == [{}, {name: []}], path
    assert "security" not in spec["paths"]["/health"]["get"]  # open, with a token too


@pytest.mark.parametrize("path", ["/openapi.json", "/docs"])
def test_the_documents_are_the_same_with_a_token_or_without(client, secured_url, path):
    with httpx.Client(base_url=secured_url) as anonymous:
        secured = anonymous.get(path)  # open without the token, like the page and /health
    assert secured.status_code == 200
    assert secured.content == client.get(path).content


@pytest.mark.e2e
def test_swagger_ui_renders_offline_in_a_browser(browser, secured_url):
    """Chromium (with no network but the loopback here and in CI) draws the operations and the
    Authorize button, from files this server sent alone."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{secured_url}/docs")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-path='/v1/predict']"), "no /v1/predict")
    assert browser.find_elements(By.CSS_SELECTOR, "button.authorize")
    loaded = browser.execute_script(
        "return [location.href].concat(performance.getEntriesByType('resource').map(e => e.name))"
    )
    assert len(loaded) >= 4  # the page, its script and stylesheet, /openapi.json
    assert all(url.startswith(f"{secured_url}/") for url in loaded), loaded
