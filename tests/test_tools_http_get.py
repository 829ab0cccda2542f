"""http_get against a real HTTP server on loopback: allowlist, internal-address, redirect and size rules."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import orjson
import pytest

from swarm.plans import ToolsConfig
from workers.tools import build_registry
from workers.tools.http_get import MAX_BODY_BYTES, HttpGetRefused, UrlGuard, fetch, html_to_text
from workers.tools.registry import ToolContext

PAGE = (
    "<html><head><title>Test page</title><style>body{color:red}</style></head>"
    "<body><h1>Heading</h1><script>var secret = 1;</script><p>First &amp; second.</p></body></html>"
)


class _Handler(BaseHTTPRequestHandler):
    served: list[str] = []

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, ctype: str, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        _Handler.served.append(self.path)
        port = self.server.server_address[1]
        if self.path == "/hello":
            self._send(200, "text/plain; charset=utf-8", "héllo world".encode())
        elif self.path == "/page":
            self._send(200, "text/html; charset=utf-8", PAGE.encode())
        elif self.path == "/json":
            self._send(200, "application/json", b'{"answer": 42}')
        elif self.path == "/big":
            self._send(200, "text/plain", b"a" * (3 * MAX_BODY_BYTES))
        elif self.path == "/binary":
            self._send(200, "image/png", b"\x89PNG" + bytes(100))
        elif self.path == "/redirect-in":
            self._send(302, "text/plain", b"", {"Location": "/hello"})
        elif self.path == "/redirect-out":
            self._send(302, "text/plain", b"", {"Location": f"http://localhost:{port}/hello"})
        elif self.path == "/loop":
            self._send(302, "text/plain", b"", {"Location": "/loop"})
        else:
            self._send(404, "text/plain", b"not found")


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _args(url: str, **extra: object) -> str:
    return orjson.dumps({"url": url, **extra}).decode()


async def test_allowed_host_gets_the_page(server: int) -> None:
    reg = build_registry(ToolsConfig(http_allowlist=["127.0.0.1"]))
    out = await reg.call("http_get", _args(f"http://127.0.0.1:{server}/hello"), ToolContext(), 10.0)
    assert not out.is_error, out.content
    assert out.content.startswith("HTTP 200 OK\n")
    assert out.content.endswith("\nhéllo world")

    out = await reg.call("http_get", _args(f"http://127.0.0.1:{server}/json"), ToolContext(), 10.0)
    assert out.content.endswith('\n{"answer": 42}')
    out = await reg.call("http_get", _args(f"http://127.0.0.1:{server}/missing"), ToolContext(), 10.0)
    assert not out.is_error and out.content.startswith("HTTP 404 Not Found")


async def test_html_is_reduced_to_visible_text(server: int) -> None:
    text = await fetch(f"http://127.0.0.1:{server}/page", UrlGuard(["127.0.0.1"]))
    assert "title: Test page" in text and "Heading\nFirst & second." in text
    assert "secret" not in text and "color:red" not in text
    assert html_to_text("<p>a</p><p>b</p>") == "a\nb"


async def test_off_by_default_and_other_hosts_refused(server: int) -> None:
    before = len(_Handler.served)
    reg = build_registry(ToolsConfig())
    out = await reg.call("http_get", _args(f"http://127.0.0.1:{server}/hello"), ToolContext(), 10.0)
    assert out.is_error and "http_allowlist is empty" in out.content
    reg = build_registry(ToolsConfig(http_allowlist=["example.org"]))
    out = await reg.call("http_get", _args(f"http://127.0.0.1:{server}/hello"), ToolContext(), 10.0)
    assert out.is_error and "host '127.0.0.1' is not in the allowlist" in out.content
    assert len(_Handler.served) == before  # the server never saw a request


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://127.0.0.1/x", "must start with http:// or https://"),
        ("file:///etc/passwd", "must start with http:// or https://"),
        ("http://user:pw@127.0.0.1/", "credentials are not allowed"),
        ("http:///nohost", "has no host"),
        ("http://127.0.0.1:notaport/", "malformed URL"),
    ],
)
async def test_bad_urls_refused(url: str, message: str) -> None:
    with pytest.raises(HttpGetRefused, match=message):
        await UrlGuard(["127.0.0.1"]).check(url)


async def test_allowlisted_name_resolving_to_loopback_is_refused(server: int) -> None:
    # "127.1" is a name that resolves to 127.0.0.1 (an SSRF classic): allowlisting the name is not enough.
    with pytest.raises(HttpGetRefused, match="resolves to internal address 127.0.0.1"):
        await UrlGuard(["127.1"]).check(f"http://127.1:{server}/hello")
    # ... but it is when the address itself is allowlisted too.
    await UrlGuard(["127.1", "127.0.0.1"]).check(f"http://127.1:{server}/hello")


async def test_redirects_are_checked_against_the_allowlist(server: int) -> None:
    guard = UrlGuard(["127.0.0.1"])
    text = await fetch(f"http://127.0.0.1:{server}/redirect-in", guard)
    assert text.startswith("HTTP 200 OK") and text.endswith("héllo world")
    with pytest.raises(HttpGetRefused, match="host 'localhost' is not in the allowlist"):
        await fetch(f"http://127.0.0.1:{server}/redirect-out", guard)
    # With localhost allowlisted the same redirect is followed.
    text = await fetch(f"http://127.0.0.1:{server}/redirect-out", UrlGuard(["127.0.0.1", "localhost"]))
    assert text.endswith("héllo world")
    with pytest.raises(HttpGetRefused, match="more than 5 redirects"):
        await fetch(f"http://127.0.0.1:{server}/loop", guard)


async def test_size_cap_and_truncation(server: int) -> None:
    text = await fetch(f"http://127.0.0.1:{server}/big", UrlGuard(["127.0.0.1"]), max_chars=5_000)
    assert f"note: body cut at {MAX_BODY_BYTES} bytes" in text
    assert f"[... {MAX_BODY_BYTES - 5_000} more characters not shown]" in text
    assert text.count("a") >= 5_000 and len(text) < 6_000

    text = await fetch(f"http://127.0.0.1:{server}/binary", UrlGuard(["127.0.0.1"]))
    assert "[binary content of 104 bytes not shown]" in text


async def test_max_chars_argument_is_validated(server: int) -> None:
    reg = build_registry(ToolsConfig(http_allowlist=["127.0.0.1"]))
    out = await reg.call("http_get", _args(f"http://127.0.0.1:{server}/hello", max_chars=5), ToolContext(), 10.0)
    assert out.is_error and "max_chars" in out.content
