"""Server configuration: one pydantic-settings class (the engine's and the model service's
fields, from `engine.settings`, plus the HTTP server's).

Every field is a `llamagen serve --flag` (generated from the field, see `cli.main`) and a
`LLAMAGEN_<FIELD>` environment variable; a flag wins over the variable. List fields take
several values (`--model a b`) or JSON in the variable (`LLAMAGEN_MODEL='["a","b"]'`).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.credentials import SigningSettings
from engine.settings import ServiceSettings


class ServerSettings(ServiceSettings, SigningSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAMAGEN_", extra="ignore")

    model: list[Path] = Field(default_factory=list, description="model directories to serve "
                              "(default: the embedded demo model)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    served_model_name: list[str] = Field(
        default_factory=list, description="the names clients use in `model` (vLLM's flag): "
        "with one --model, NAME [NAME ...], the first reported by /v1/models; with several, "
        "MODEL=NAME entries, MODEL a model directory's name (a model without one keeps its "
        "own name); every name is accepted")
    api_key: SecretStr | None = Field(None, description="require `Authorization: Bearer KEY` "
                                      "on every /v1 route (one key, named `default`, "
                                      "without limits; beside --api-keys-file if both)")
    api_keys_file: Path | None = Field(
        None, description="API keys with tiers, one JSON object per line: name, key or "
        "sha256, default_priority, max_priority, images_per_minute, max_images_in_flight "
        "(README, 'Tenants'); read again on SIGHUP and when it changes")
    api_keys_reload_s: float = Field(2.0, gt=0, description="how often the keys file is "
                                     "checked for changes")
    lora_modules: list[str] = Field(
        default_factory=list, description="LoRA adapters to serve (vLLM's flag): NAME=PATH "
        "(PATH a PEFT adapter directory) or JSON {\"name\", \"path\", \"base_model_name\"}; "
        "with several models, base_model_name (a served name) says whose adapter it is; "
        "turns on --enable-lora")
    allow_runtime_lora_updating: bool = Field(
        False, description="offer POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
        "(vLLM's routes; only to admin API keys: --api-key, or `admin` in the keys file)")
    max_images_per_request: int = Field(10, ge=1, le=100, description="cap on n / labels")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body accepted")
    max_upload_bytes: int = Field(16 << 20, ge=1024, description="largest image or mask file "
                                  "an edit accepts (the edits route's body may hold two, plus "
                                  "its fields)")
    max_upload_pixels: int = Field(64_000_000, ge=1, description="largest image or mask an "
                                   "edit decodes, in pixels (a guard against decompression "
                                   "bombs)")
    default_response_format: Literal["both", "url", "b64_json"] = Field(
        "both", description="what an OpenAI request that omits response_format gets: both "
        "(`url` and `b64_json` in each image: clients that read either work), url or b64_json")
    max_output_size: int = Field(2048, ge=16, le=8192, description="largest square `size` "
                                 "delivered (resampled from the model's native size)")
    strict_size: bool = Field(False, description="accept only `auto` and the model's native "
                              "size (no resampling)")
    image_url_hosts: list[str] = Field(
        default_factory=list, description="hosts whose http(s) image URLs edits may fetch "
        "(`*.example.com` matches its subdomains; default: none, only data: URLs)")
    image_url_networks: list[str] = Field(
        default_factory=list, description="private, loopback or link-local networks (CIDR) "
        "those fetches may reach anyway (default: none; public addresses only)")
    image_url_timeout_s: float = Field(10.0, gt=0, le=300, description="the longest an image "
                                       "URL fetch may take, redirects included")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection whose request "
                                    "headers are not complete within this is closed")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body not received "
                                  "within this (between its chunks) is answered 408")
    max_streams: int = Field(256, ge=1, description="concurrent streamed responses; beyond "
                             "it a streaming request gets 429")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM or engine death, how "
                                   "long in-flight requests may finish")
    request_timeout_s: float = Field(600.0, gt=0, description="a generation request still "
                                     "unfinished after this long is aborted (504)")
    image_dir: Path = Field(Path("/tmp/llamagen-images"), description="where url-format "
                            "images are stored when --image-store is not given")
    image_store: str | None = Field(None, description="shared object storage for url-format "
                                    "images, s3://bucket/prefix (AWS credential chain); any "
                                    "replica then serves any image")
    image_store_endpoint: str | None = Field(None, description="S3-compatible endpoint URL "
                                             "(MinIO, Ceph, R2, GCS interop; default: AWS, "
                                             "or AWS_ENDPOINT_URL)")
    image_ttl_s: float = Field(3600.0, gt=0, description="how long url-format images live")
    public_url: str | None = Field(None, description="base URL for image links (default: the "
                                   "request's own)")
    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("image_url_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for text in v:
            ipaddress.ip_network(text, strict=False)  # a ValueError names the bad entry
        return v

    def served_names(self, models: list[str]) -> dict[str, list[str]]:
        """Each model's names from --served-model-name (models: the directories' names, in
        order), the first one reported. ValueError for an entry that names no served model
        or a name two models share."""
        names: dict[str, list[str]] = {m: [] for m in models}
        for entry in self.served_model_name:
            model, sep, name = entry.partition("=")
            if not sep:
                name = entry
                if len(models) > 1:
                    raise ValueError(f"--served-model-name {entry!r}: with several models, "
                                     f"write MODEL=NAME, MODEL one of {', '.join(models)}")
                model = models[0]
            if model not in names:
                raise ValueError(f"--served-model-name {entry!r}: no served model is named "
                                 f"{model!r} (served: {', '.join(models)})")
            if not name.strip():
                raise ValueError(f"--served-model-name {entry!r}: the name is empty")
            names[model].append(name)
        chosen = {m: given or [m] for m, given in names.items()}
        seen: dict[str, str] = {}
        for model, given in chosen.items():
            for name in given:
                if seen.setdefault(name, model) != model:
                    raise ValueError(f"--served-model-name: {name!r} names two models, "
                                     f"{seen[name]} and {model}")
        return chosen

    def adapters(self, names: dict[str, list[str]]) -> dict[str, list[tuple[str, Path]]]:
        """--lora-modules per model directory name (`names`: each model's served names).
        ValueError naming a bad entry, an unknown base, or a name used twice."""
        by_name = {n: model for model, served in names.items() for n in served}
        out: dict[str, list[tuple[str, Path]]] = {model: [] for model in names}
        seen: set[str] = set(by_name)
        for entry in self.lora_modules:
            base = None
            if entry.lstrip().startswith("{"):
                try:
                    spec = json.loads(entry)
                    name, path = spec["name"], spec["path"]
                    base = spec.get("base_model_name")
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"--lora-modules {entry[:80]!r}: JSON needs \"name\" and "
                                     "\"path\"") from None
            else:
                name, sep, path = entry.partition("=")
                if not sep:
                    raise ValueError(f"--lora-modules {entry[:80]!r}: write NAME=PATH")
            if not isinstance(name, str) or not name.strip() or not isinstance(path, str):
                raise ValueError(f"--lora-modules {entry[:80]!r}: the name is empty")
            if name in seen:
                raise ValueError(f"--lora-modules: {name!r} is already a model's or an "
                                 "adapter's name")
            seen.add(name)
            if base is None:
                if len(names) > 1:
                    raise ValueError(f"--lora-modules {name!r}: with several models, give "
                                     "JSON with base_model_name (one of "
                                     f"{', '.join(by_name)})")
                model = next(iter(names))
            elif base in by_name:
                model = by_name[base]
            else:
                raise ValueError(f"--lora-modules {name!r}: base_model_name {base!r} is not "
                                 f"served (served: {', '.join(by_name)})")
            out[model].append((name, Path(path)))
        return out

    @model_validator(mode="after")
    def _lora_modules_enable_lora(self) -> ServerSettings:
        if self.lora_modules:
            self.enable_lora = True
        return self

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> ServerSettings:
        if self.max_queued_images < self.max_images_per_request:
            raise ValueError("max_queued_images must be >= max_images_per_request")
        return self
