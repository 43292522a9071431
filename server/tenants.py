"""API keys with tiers: who is asking, how urgent their work is, and how much they may ask.

`--api-keys-file` holds one key per line, as a JSON object (blank lines and `#` comments are
skipped):

    {"name": "web", "key": "sk-...", "default_priority": -10, "max_priority": -10,
     "images_per_minute": 600, "max_images_in_flight": 32}
    {"name": "bulk", "sha256": "9f86d0...", "default_priority": 10}

`key` or `sha256` (the hex digest of the key, so the file need not hold the secret). Priority
has vLLM's meaning, lower runs first; `max_priority` is the most urgent (lowest) value the key
may ask for (default: its `default_priority`); `admin: true` lets it load and unload LoRA
adapters at run time (with --allow-runtime-lora-updating). Limits are optional: images per
minute (a token bucket of that many images, refilled continuously) and images in flight.
`--api-key` stays as the short form of one key, named `default`, without limits, an admin.
Keys are held as sha256 digests, compared in constant time and never logged; metrics and logs
name the key's `name`.

The file is read again on SIGHUP and whenever it changes; a file that no longer parses keeps
the keys in force (and says why in the log). Counters of a key survive a reload by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger("llamagen.tenants")

# The `priority` a request may ask for (vLLM's meaning: lower runs first).
PRIORITY_MIN, PRIORITY_MAX = -100, 100
HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
ANONYMOUS = "anonymous"  # the name usage is counted under when no key is required


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and the line."""


class KeySpec(BaseModel):
    """One line of the keys file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    key: str | None = Field(None, min_length=1, max_length=512)
    sha256: str | None = None
    default_priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    max_priority: int | None = Field(None, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    images_per_minute: int | None = Field(None, ge=1)
    max_images_in_flight: int | None = Field(None, ge=1)
    admin: bool = False  # may load and unload LoRA adapters at run time

    @model_validator(mode="after")
    def _one_key(self) -> KeySpec:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key and sha256")
        if self.sha256 is not None and not HEX_SHA256.fullmatch(self.sha256):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        if self.max_priority is not None and self.max_priority > self.default_priority:
            raise ValueError(f"max_priority {self.max_priority} is less urgent than "
                             f"default_priority {self.default_priority} (lower runs first)")
        return self

    @property
    def digest(self) -> bytes:
        if self.key is not None:
            return hashlib.sha256(self.key.encode()).digest()
        assert self.sha256 is not None
        return bytes.fromhex(self.sha256)

    @property
    def most_urgent(self) -> int:
        return self.default_priority if self.max_priority is None else self.max_priority


class OverLimit(Exception):
    """A key's limit refuses the request: retry after `retry_after_s` (None: the request
    is larger than the limit itself, so no retry would pass)."""

    def __init__(self, message: str, reason: str, retry_after_s: int | None):
        super().__init__(message)
        self.reason, self.retry_after_s = reason, retry_after_s


@dataclass
class Tenant:
    """A key's limits and live counters (images in flight, its per-minute bucket)."""

    spec: KeySpec
    in_flight: int = 0
    tokens: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.spec.name

    def _refill(self, now: float) -> None:
        rate = self.spec.images_per_minute
        if rate is not None:
            self.tokens = min(float(rate), self.tokens + (now - self.updated) * rate / 60)
        self.updated = now

    def admit(self, images: int) -> Callable[[], None]:
        """Take `images` from the key's limits (OverLimit when they do not allow it); the
        returned callable gives the in-flight ones back."""
        limit, rate = self.spec.max_images_in_flight, self.spec.images_per_minute
        for cap, what in ((limit, "images in flight"), (rate, "images per minute")):
            if cap is not None and images > cap:
                raise OverLimit(f"key {self.name!r}: {images} images exceed its limit of "
                                f"{cap} {what}", what.replace(" ", "_"), None)
        if limit is not None and self.in_flight + images > limit:
            raise OverLimit(f"key {self.name!r}: {self.in_flight} images in flight, limit "
                            f"{limit}", "images_in_flight", 5)
        now = time.monotonic()
        self._refill(now)
        if rate is not None:
            if self.tokens < images:
                wait = (images - self.tokens) * 60 / rate
                raise OverLimit(f"key {self.name!r}: over its limit of {rate} images per "
                                "minute", "images_per_minute", max(1, math.ceil(wait)))
            self.tokens -= images
        self.in_flight += images
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= images

        return release


def read_keys_file(path: Path) -> list[KeySpec]:
    """Every key of the file, checked as a whole (KeysFileError naming the line)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise KeysFileError(f"{path}: cannot be read ({type(e).__name__})") from None
    specs: list[KeySpec] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            spec = KeySpec.model_validate(json.loads(text))
        except json.JSONDecodeError as e:
            raise KeysFileError(f"{path} line {number}: not a JSON object ({e.msg})") from None
        except ValidationError as e:
            first = e.errors()[0]
            where = "".join(f"{p}: " for p in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            # The message never echoes the value given: it may be a key.
            raise KeysFileError(f"{path} line {number}: {where}{message}") from None
        if spec.name in names:
            raise KeysFileError(f"{path} line {number}: the name {spec.name!r} is used twice")
        if spec.digest in digests:
            raise KeysFileError(f"{path} line {number}: the same key as an earlier line")
        names.add(spec.name)
        digests.add(spec.digest)
        specs.append(spec)
    if not specs:
        raise KeysFileError(f"{path}: no keys (every line is blank or a comment)")
    return specs


class KeyRing:
    """The keys in force: the keys file's (reloaded) and the single `--api-key`."""

    def __init__(self, single_key: str | None = None, path: Path | None = None,
                 priorities: bool = True):
        """priorities: whether requests may run at a priority other than 0 (the engine's
        scheduling policy is `priority`); a keys file giving one otherwise is refused."""
        self.path, self.priorities = path, priorities
        # The operator's own key: any priority, no limits, an admin.
        self._single = (None if single_key is None else
                        KeySpec(name="default", key=single_key, max_priority=PRIORITY_MIN,
                                admin=True))
        self._tenants: dict[str, Tenant] = {}
        self._mtime: float | None = None
        self.reload(strict=True)

    @property
    def required(self) -> bool:
        return bool(self._tenants)

    def _specs(self) -> list[KeySpec]:
        specs = [] if self.path is None else read_keys_file(self.path)
        for spec in specs:
            if not self.priorities and spec.default_priority != 0:
                raise KeysFileError(f"{self.path}: key {spec.name!r} has default_priority "
                                    f"{spec.default_priority}, which needs "
                                    "--scheduling-policy priority")
        if self._single is not None:
            if any(s.name == "default" for s in specs):
                raise KeysFileError(f"{self.path}: the name 'default' is --api-key's")
            specs.append(self._single)
        return specs

    def reload(self, strict: bool = False) -> bool:
        """Read the keys again; True when they changed. `strict` (start-up): a bad file
        raises KeysFileError; later, the keys in force stay and the log says why."""
        try:
            mtime = None if self.path is None else self.path.stat().st_mtime
            specs = self._specs()
        except (KeysFileError, OSError) as e:
            if strict:
                raise KeysFileError(str(e)) from None
            log.error("keys file not reloaded, the keys in force stay: %s", e)
            return False
        old = self._tenants
        self._tenants = {}
        for spec in specs:
            tenant = old.get(spec.name)
            if tenant is None:
                tenant = Tenant(spec, tokens=float(spec.images_per_minute or 0))
            else:
                tenant.spec = spec
                if spec.images_per_minute is not None:
                    tenant.tokens = min(tenant.tokens, float(spec.images_per_minute))
            self._tenants[spec.name] = tenant
        self._mtime = mtime
        if not strict:
            log.info("keys file reloaded: %d keys", len(self._tenants))
        return True

    def changed(self) -> bool:
        """Whether the keys file changed since it was read."""
        if self.path is None:
            return False
        try:
            return self.path.stat().st_mtime != self._mtime
        except OSError:
            return True

    def lookup(self, given: str) -> Tenant | None:
        """The tenant whose key is `given`, comparing against every key in constant time."""
        digest = hashlib.sha256(given.encode()).digest()
        found = None
        for tenant in self._tenants.values():
            if secrets.compare_digest(digest, tenant.spec.digest):
                found = tenant
        return found

    def names(self) -> list[str]:
        return list(self._tenants)
