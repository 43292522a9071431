"""Server configuration: one pydantic-settings class (the engine's and the model service's
fields, from `engine.settings`, plus the HTTP server's).

Every field is a `llamagen serve --flag` (generated from the field, see `cli.main`) and a
`LLAMAGEN_<FIELD>` environment variable; a flag wins over the variable. List fields take
several values (`--model a b`) or JSON in the variable (`LLAMAGEN_MODEL='["a","b"]'`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.credentials import SigningSettings
from engine.settings import ServiceSettings


class ServerSettings(ServiceSettings, SigningSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAMAGEN_", extra="ignore")

    model: list[Path] = Field(default_factory=list, description="model directories to serve "
                              "(default: the embedded demo model)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: SecretStr | None = Field(None, description="require `Authorization: Bearer KEY` "
                                      "on every /v1 route")
    max_images_per_request: int = Field(10, ge=1, le=100, description="cap on n / labels")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body accepted")
    max_upload_bytes: int = Field(16 << 20, ge=1024, description="largest image or mask file "
                                  "an edit accepts (the edits route's body may hold two, plus "
                                  "its fields)")
    max_upload_pixels: int = Field(64_000_000, ge=1, description="largest image or mask an "
                                   "edit decodes, in pixels (a guard against decompression "
                                   "bombs)")
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

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> ServerSettings:
        if self.max_queued_images < self.max_images_per_request:
            raise ValueError("max_queued_images must be >= max_images_per_request")
        return self
