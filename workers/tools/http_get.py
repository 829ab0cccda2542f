"""`http_get`: fetch a web page from an allowlisted host (off unless ToolsConfig.http_allowlist names hosts).

Checks on every request and every redirect hop: scheme http/https, host exactly in the allowlist,
and every address the host resolves to must be public unless the host or that address is itself
allowlisted (so an allowlisted name cannot point the tool at loopback or the cluster's private
network). Responses are streamed and cut at MAX_BODY_BYTES; HTML is reduced to its text.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
from pydantic import BaseModel, Field

from workers.tools.registry import Tool, ToolContext

MAX_BODY_BYTES = 1_000_000
MAX_REDIRECTS = 5
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_MAX_CHARS = 8_000
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml", "+json", "+xml", "javascript")


class HttpGetRefused(ValueError):
    """The URL is not allowed; the message says which rule refused it."""


class HttpGetArgs(BaseModel):
    url: str = Field(
        min_length=1,
        max_length=4_000,
        description="Absolute http:// or https:// URL on one of the allowed hosts.",
    )
    max_chars: int = Field(
        DEFAULT_MAX_CHARS,
        ge=100,
        le=20_000,
        description="Return at most this many characters of the page text (100-20000, default 8000).",
    )


def _normalize_host(host: str) -> str:
    return host.strip().lower().rstrip(".").strip("[]")


def _is_internal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


class UrlGuard:
    """The allowlist rules of one job."""

    def __init__(self, allowlist: list[str]) -> None:
        self.allow = {_normalize_host(h) for h in allowlist if h.strip()}

    async def check(self, url: str) -> None:
        """Raise HttpGetRefused unless `url` may be fetched."""
        if not self.allow:
            raise HttpGetRefused("http_get is disabled for this job: ToolsConfig.http_allowlist is empty")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise HttpGetRefused(f"malformed URL {url!r}: {e}") from None
        if parts.scheme not in ("http", "https"):
            raise HttpGetRefused(f"URL {url!r} must start with http:// or https://")
        if parts.username or parts.password:
            raise HttpGetRefused("URLs with user:password@ credentials are not allowed")
        host = _normalize_host(parts.hostname or "")
        if not host:
            raise HttpGetRefused(f"URL {url!r} has no host")
        if host not in self.allow:
            raise HttpGetRefused(f"host {host!r} is not in the allowlist ({', '.join(sorted(self.allow))})")
        port = port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise HttpGetRefused(f"cannot resolve host {host!r}: {e}") from None
        for info in infos:
            addr = str(info[4][0]).split("%")[0]
            ip = ipaddress.ip_address(addr)
            # An allowlisted literal IP, or "localhost" resolving to loopback, is the operator's choice.
            explicit = host == str(ip) or str(ip) in self.allow or (host == "localhost" and ip.is_loopback)
            if _is_internal(ip) and not explicit:
                raise HttpGetRefused(
                    f"host {host!r} resolves to internal address {ip}; allowlist that address to permit it"
                )


class _TextExtractor(HTMLParser):
    """Visible text of an HTML page: drops script/style, keeps line breaks at block elements."""

    _SKIP = {"script", "style", "noscript", "template", "svg", "head"}
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "section", "article", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self._SKIP:
            self._skip_depth += 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self._SKIP and self._skip_depth:
            self._skip_depth -= 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip_depth:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    body = "\n".join(line for line in lines if line)
    title = " ".join(parser.title.split())
    return f"title: {title}\n\n{body}" if title else body


async def fetch(url: str, guard: UrlGuard, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """GET `url` following allowlisted redirects; the response text, truncated, with a short header."""
    async with httpx.AsyncClient(
        follow_redirects=False, timeout=timeout_s, trust_env=False, headers={"User-Agent": "agent-swarm-http_get/0.1"}
    ) as client:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            await guard.check(current)
            async with client.stream("GET", current) as resp:
                if resp.is_redirect and "location" in resp.headers:
                    current = urljoin(current, resp.headers["location"])
                    continue
                body = bytearray()
                truncated = False
                async for chunk in resp.aiter_bytes():
                    body.extend(chunk)
                    if len(body) >= MAX_BODY_BYTES:
                        del body[MAX_BODY_BYTES:]
                        truncated = True
                        break
                return _render(resp, bytes(body), truncated, max_chars)
        raise HttpGetRefused(f"more than {MAX_REDIRECTS} redirects starting at {url!r}")


def _render(resp: httpx.Response, body: bytes, truncated: bool, max_chars: int) -> str:
    ctype = resp.headers.get("content-type", "")
    head = f"HTTP {resp.status_code} {resp.reason_phrase}\nurl: {resp.url}\ncontent-type: {ctype or 'unknown'}\n"
    if truncated:
        head += f"note: body cut at {MAX_BODY_BYTES} bytes\n"
    lowered = ctype.lower()
    if ctype and not any(t in lowered for t in _TEXT_TYPES):
        return head + f"\n[binary content of {len(body)}{'+' if truncated else ''} bytes not shown]"
    text = body.decode(resp.encoding or "utf-8", errors="replace")
    if "html" in lowered or (not ctype and text.lstrip()[:15].lower().startswith(("<!doctype html", "<html"))):
        text = html_to_text(text)
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n[... {len(text) - max_chars} more characters not shown]"
    return head + "\n" + text


def make_http_get_tool(allowlist: list[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> Tool:
    guard = UrlGuard(allowlist)

    async def http_get_tool(args: HttpGetArgs, ctx: ToolContext) -> str:
        return await fetch(args.url, guard, timeout_s=timeout_s, max_chars=args.max_chars)

    hosts = ", ".join(sorted(guard.allow)) if guard.allow else "none (the tool is disabled for this job)"
    return Tool(
        name="http_get",
        description=(
            "Fetch a web page or API response with an HTTP GET and return its status and text "
            "(HTML reduced to visible text, long bodies truncated). Only these hosts can be "
            f"reached: {hosts}. Other hosts are refused."
        ),
        args_model=HttpGetArgs,
        fn=http_get_tool,
    )
