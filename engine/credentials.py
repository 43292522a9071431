"""Signed Content Credentials (C2PA) for every image this project writes.

Each image gets a C2PA manifest signed with `c2pa-python` (the Content Authenticity
Initiative's own binding of the reference Rust SDK, so standard readers verify what we write):

- a `c2pa.actions` assertion with `c2pa.created`, the IPTC digital source type
  `trainedAlgorithmicMedia` and the software agent `llamagen-serve/<version>`;
- an `org.llamagen.generation` assertion with the provenance record the unsigned metadata
  also carries (model, checkpoint sha256, seed, sampling parameters, class or prompt, time).

Keys: `--c2pa-cert` (PEM chain, signing certificate first) and `--c2pa-key` (PEM private
key); the algorithm follows the key (EC P-256/384/521 -> ES256/384/512, RSA -> PS256,
Ed25519 -> Ed25519). Without them a development CA and signing certificate are made once in
`--c2pa-dir` and reused; their names say "UNTRUSTED development". Readers then report the
signature and the content hash valid, the signer not trusted. An operator whose key lives in
a KMS or HSM builds `ContentCredentials.from_callback` with a function that signs bytes.

A failed signature fails the image's request (`SigningError`): an image is never delivered
with less provenance than was promised.
"""

from __future__ import annotations

import datetime
import fcntl
import io
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, Field

from model_registry.convert import software_version
from vq_decoder.encoding import DIGITAL_SOURCE_TYPE, EDITED_SOURCE_TYPE, IMAGE_FORMATS

log = logging.getLogger("llamagen.credentials")
GENERATION_ASSERTION = "org.llamagen.generation"
INPUT = "input"  # an edit's parent ingredient
DEV_CERT, DEV_KEY, DEV_CA = "signer-chain.pem", "signer-key.pem", "ca.pem"


class SigningError(RuntimeError):
    """An image could not be signed."""


class SigningSettings(BaseModel):
    """C2PA signing of image files (every field also a flag and a LLAMAGEN_* variable)."""

    c2pa: bool = Field(True, description="sign every image with C2PA Content Credentials "
                       "(--no-c2pa: unsigned metadata only)")
    c2pa_cert: Path | None = Field(None, description="PEM certificate chain (signing "
                                   "certificate first) for C2PA signing")
    c2pa_key: Path | None = Field(None, description="PEM private key of the C2PA signing "
                                  "certificate; the algorithm follows the key")
    c2pa_dir: Path = Field(Path("/tmp/llamagen-c2pa"), description="where an UNTRUSTED "
                           "development CA and signing certificate are made when no "
                           "--c2pa-cert/--c2pa-key are given")


def algorithm_for(key: Any) -> str:
    """The C2PA signing algorithm name for a private key (cryptography's key types)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        names = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if key.curve.name not in names:
            raise SigningError(f"unsupported EC curve {key.curve.name} for C2PA")
        return names[key.curve.name]
    if isinstance(key, rsa.RSAPrivateKey):
        return "PS256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ED25519"
    raise SigningError(f"unsupported key type {type(key).__name__} for C2PA")


def make_development_credentials(directory: Path) -> tuple[Path, Path]:
    """An UNTRUSTED development CA and an ES256 signing certificate it issued, in
    `directory` (made once, then reused). Returns (certificate chain, private key)."""
    chain_path, key_path = directory / DEV_CERT, directory / DEV_KEY
    directory.mkdir(parents=True, exist_ok=True)
    # Processes starting together (replicas, tests) must not pair one's key with another's
    # certificate.
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (chain_path.is_file() and key_path.is_file()):
            _write_development_credentials(chain_path, key_path)
    return chain_path, key_path


def _write_development_credentials(chain_path: Path, key_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    org = "llamagen-serve UNTRUSTED development credentials"

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])

    def usage(**flags: bool) -> x509.KeyUsage:
        fields = ("digital_signature", "content_commitment", "key_encipherment",
                  "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
                  "encipher_only", "decipher_only")
        return x509.KeyUsage(**{f: flags.get(f, False) for f in fields})

    ca_key, key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca = (x509.CertificateBuilder().subject_name(name("UNTRUSTED llamagen-serve dev CA"))
          .issuer_name(name("UNTRUSTED llamagen-serve dev CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    # C2PA's certificate profile: an end-entity certificate, digitalSignature, an allowed EKU.
    cert = (x509.CertificateBuilder().subject_name(name("UNTRUSTED llamagen-serve dev signer"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (chain_path.parent / DEV_CA).write_bytes(ca.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    chain_path.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    log.info("made UNTRUSTED development C2PA credentials in %s", chain_path.parent)


class ContentCredentials:
    """Signs encoded image files with one C2PA signer (thread-safe)."""

    def __init__(self, signer: Any):
        import c2pa

        self._signer = signer
        self.version = software_version()
        # No thumbnail: the image is its own preview, and a thumbnail would grow small
        # images by tens of kilobytes.
        self._context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})
        self._lock = threading.Lock()  # one signer handle, used by one thread at a time

    @classmethod
    def from_files(cls, chain: Path, key: Path) -> ContentCredentials:
        import c2pa

        try:
            chain_pem, key_pem = chain.read_bytes(), key.read_bytes()
            algorithm = algorithm_for(load_pem_private_key(key_pem, password=None))
            info = c2pa.C2paSignerInfo(getattr(c2pa.C2paSigningAlg, algorithm), chain_pem,
                                       key_pem, None)
            return cls(c2pa.Signer.from_info(info))
        except (OSError, ValueError, c2pa.C2paError) as e:
            raise SigningError(f"C2PA credentials {chain}, {key}: {e}") from e

    @classmethod
    def from_callback(cls, sign: Callable[[bytes], bytes], chain_pem: str, algorithm: str
                      ) -> ContentCredentials:
        """The KMS/HSM hook: `sign(data) -> signature` in the algorithm's C2PA (COSE) form
        (ES*: ECDSA, DER or raw r||s; PS*: RSA-PSS; ED25519), with the certificate chain in
        PEM."""
        import c2pa

        signer = c2pa.Signer.from_callback(sign, getattr(c2pa.C2paSigningAlg, algorithm),
                                           chain_pem)
        return cls(signer)

    @classmethod
    def from_settings(cls, settings: SigningSettings) -> ContentCredentials | None:
        """The configured signer: given files, else development credentials; None when
        signing is off."""
        if not settings.c2pa:
            return None
        if (settings.c2pa_cert is None) != (settings.c2pa_key is None):
            raise SigningError("give both --c2pa-cert and --c2pa-key, or neither")
        if settings.c2pa_cert is not None and settings.c2pa_key is not None:
            return cls.from_files(settings.c2pa_cert, settings.c2pa_key)
        chain, key = make_development_credentials(settings.c2pa_dir)
        log.warning("signing images with UNTRUSTED development C2PA credentials (%s): readers "
                    "will find the signature valid and the signer untrusted; give "
                    "--c2pa-cert/--c2pa-key in production", chain)
        return cls.from_files(chain, key)

    def manifest(self, record: dict[str, Any], title: str, *, edited: bool = False
                 ) -> dict[str, Any]:
        agent = {"name": f"llamagen-serve/{self.version}"}
        if edited:
            # The input image is the parent ingredient: opened, then completed by the model.
            how = ("without a condition (a variation)" if record.get("unconditional")
                   else "for the prompt")
            actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": [INPUT]}},
                       {"action": "c2pa.edited", "digitalSourceType": EDITED_SOURCE_TYPE,
                        "softwareAgent": agent,
                        "description": "token rows below the kept ones redrawn by "
                                       f"autoregressive completion {how}"}]
        elif "edit" in record:
            # A completion of image tokens the client gave: no input file to cite, so a
            # creation whose source type says part of it was given (a composite).
            actions = [{"action": "c2pa.created", "digitalSourceType": EDITED_SOURCE_TYPE,
                        "softwareAgent": agent,
                        "description": f"completes {record['edit']['kept_tokens']} given "
                                       "image tokens by autoregressive generation"}]
        else:
            actions = [{"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE,
                        "softwareAgent": agent}]
        if "resampled" in record:
            resampled = record["resampled"]
            actions.append({"action": "c2pa.resized", "softwareAgent": agent,
                            "description": f"resampled from {resampled['native_size']} to "
                                           f"{resampled['size']} ({resampled['filter']})"})
        return {
            "claim_generator_info": [{"name": "llamagen-serve", "version": self.version}],
            "title": title,
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": actions}},
                {"label": GENERATION_ASSERTION, "data": record},
            ],
        }

    def sign(self, data: bytes, fmt: str, record: dict[str, Any], *,
             ingredient: tuple[bytes, str] | None = None) -> bytes:
        """An encoded image -> the same image with a signed C2PA manifest embedded.
        `ingredient` (file bytes, media type): the image was edited from it (`c2pa.edited`,
        the input a parent ingredient, carrying its own manifest if it had one)."""
        import c2pa

        spec = IMAGE_FORMATS[fmt]
        out = io.BytesIO()
        manifest = self.manifest(record, f"image.{spec.extension}",
                                 edited=ingredient is not None)
        try:
            with self._lock, c2pa.Builder(manifest, self._context) as builder:
                if ingredient is not None:
                    source, media_type = ingredient
                    builder.add_ingredient({"title": "input image", "relationship": "parentOf",
                                            "label": INPUT}, media_type, io.BytesIO(source))
                builder.sign(self._signer, spec.media_type, io.BytesIO(data), out)
        except Exception as e:
            raise SigningError(f"C2PA signing failed: {e}") from e
        return out.getvalue()
