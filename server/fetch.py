"""Image inputs given by reference (JSON edits' `image_url`): `data:` URLs, and http(s) URLs
only from the hosts an operator allows.

A server that fetches what a client names is a server-side request forgery hole, so a fetch
is refused unless every one of these holds, for the URL and again for every redirect:
the scheme is http or https; the host is in `--image-url-hosts`; every address the host
resolves to is public (not private, loopback, link-local, shared, reserved or multicast)
unless it lies in a network of `--image-url-networks`. The connection goes to the address
that was checked (the Host header and TLS server name carry the name), so a second DNS answer
cannot point it elsewhere. The whole fetch, redirects included, has one deadline and a byte
limit; no proxy from the environment is used.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DATA_URL = re.compile(r"data:(?P<type>[^,;]*)(?P<params>(;[^,;]*)*),", re.IGNORECASE)
REDIRECTS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 3


class FetchRefused(Exception):
    """The reference is not fetched or not usable; the message is for the client."""

    code = "invalid_image_url"


class ImageTooLarge(FetchRefused):
    code = "image_too_large"


class ImageSource(Protocol):
    """An input image's bytes, read on demand within a byte limit."""

    async def read(self, limit: int) -> bytes: ...


@dataclass(frozen=True)
class DataUrl:
    """`data:image/png;base64,...`: the bytes travel in the request."""

    payload: str

    @classmethod
    def parse(cls, url: str) -> DataUrl:
        head = DATA_URL.match(url)
        if head is None:
            raise FetchRefused("not a data: URL (data:image/png;base64,...)")
        media_type = head["type"].strip().lower()
        if media_type and not media_type.startswith("image/"):
            raise FetchRefused(f"a data: URL of {media_type[:40]!r}, not an image")
        if "base64" not in (p.strip().lower() for p in head["params"].split(";")):
            # Percent-encoded image bytes are legal but no client sends them.
            return cls(base64.b64encode(unquote_to_bytes(url[head.end():])).decode())
        return cls(url[head.end():])

    async def read(self, limit: int) -> bytes:
        return self.decode(limit)

    def decode(self, limit: int) -> bytes:
        """The image's bytes (no I/O: they travel in the URL)."""
        text = "".join(self.payload.split())
        if len(text) * 3 // 4 > limit + 2:
            raise ImageTooLarge(f"the image exceeds {limit} bytes")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise FetchRefused("the data: URL is not valid base64") from None
        if len(data) > limit:
            raise ImageTooLarge(f"the image exceeds {limit} bytes")
        return data


@dataclass(frozen=True)
class FetchPolicy:
    """Which http(s) URLs may be fetched, and how long and large a fetch may be."""

    hosts: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, hosts: list[str], networks: list[str], timeout_s: float
                      ) -> FetchPolicy:
        return cls(tuple(h.lower().rstrip(".") for h in hosts),
                   tuple(ipaddress.ip_network(n, strict=False) for n in networks), timeout_s)

    def source(self, url: str) -> ImageSource:
        """The reference as a source to read, checked as far as it can be without a network
        request (FetchRefused when it is refused)."""
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            return DataUrl.parse(url)
        if scheme not in ("http", "https"):
            raise FetchRefused("give a data: URL, or an http(s) URL of an allowed host")
        self.check_host(url)
        return RemoteImage(url, self)

    def check_host(self, url: str) -> str:
        """The URL's host, if the operator allows fetching from it."""
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower().rstrip(".")
            parts.port  # noqa: B018 (raises ValueError for a bad port)
        except ValueError:
            raise FetchRefused("not a valid URL") from None
        if parts.scheme.lower() not in ("http", "https") or not host:
            raise FetchRefused("only http(s) URLs with a host are fetched")
        if parts.username or parts.password:
            raise FetchRefused("URLs with credentials are not fetched")
        if not self.hosts:
            raise FetchRefused("this server fetches no image URLs (an operator allows hosts "
                               "with --image-url-hosts); send a data: URL")
        if not any(host == h or (h.startswith("*.") and host.endswith(h[1:]))
                   for h in self.hosts):
            raise FetchRefused(f"host {host[:100]!r} is not among the hosts this server "
                               "fetches images from")
        return host

    def check_address(self, address: IPAddress) -> None:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.networks):
            return
        if not address.is_global or address.is_multicast:
            raise FetchRefused("the URL's host resolves to a non-public address, which this "
                               "server does not fetch from")


@dataclass(frozen=True)
class RemoteImage:
    url: str
    policy: FetchPolicy

    async def read(self, limit: int) -> bytes:
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                return await self._fetch(limit)
        except TimeoutError:
            raise FetchRefused(f"the image URL did not answer within "
                               f"{self.policy.timeout_s:g} s") from None
        except httpx.HTTPError:
            raise FetchRefused("the image URL could not be fetched") from None

    async def _fetch(self, limit: int) -> bytes:
        url = self.url
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                     timeout=self.policy.timeout_s) as client:
            for _ in range(MAX_REDIRECTS + 1):
                host = self.policy.check_host(url)
                address = await self._resolve(url, host)
                parts = urlsplit(url)
                # Connect to the checked address; the name goes in Host and in TLS's SNI
                # (which the certificate is verified against).
                literal = f"[{address}]" if address.version == 6 else str(address)
                netloc = literal if parts.port is None else f"{literal}:{parts.port}"
                pinned = parts._replace(netloc=netloc).geturl()
                request = client.build_request(
                    "GET", pinned, headers={"Host": parts.netloc.rpartition("@")[2],
                                            "Accept": "image/*"},
                    extensions={"sni_hostname": host})
                response = await client.send(request, stream=True)
                try:
                    if response.status_code in REDIRECTS and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise FetchRefused(f"fetching the image URL answered HTTP "
                                           f"{response.status_code}")
                    return await _read_limited(response, limit)
                finally:
                    await response.aclose()
        raise FetchRefused(f"the image URL redirected more than {MAX_REDIRECTS} times")

    async def _resolve(self, url: str, host: str) -> IPAddress:
        """The host's address, every one it resolves to checked against the policy."""
        try:
            return _checked([ipaddress.ip_address(host)], self.policy)
        except ValueError:
            pass
        port = urlsplit(url).port or (443 if url.lower().startswith("https") else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise FetchRefused(f"host {host[:100]!r} could not be resolved") from None
        return _checked([ipaddress.ip_address(info[4][0]) for info in infos], self.policy)


def _checked(addresses: list[IPAddress], policy: FetchPolicy) -> IPAddress:
    if not addresses:
        raise FetchRefused("the URL's host has no address")
    for address in addresses:
        policy.check_address(address)
    return addresses[0]


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ImageTooLarge(f"the image exceeds {limit} bytes")
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():  # decoded: the limit is on the image
        size += len(chunk)
        if size > limit:
            raise ImageTooLarge(f"the image exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
