"""Signed Content Credentials: every format carries a C2PA manifest that c2pa's own Reader
validates; a changed pixel byte is a hash mismatch; keys from files, from a callback
(the KMS/HSM hook), or made for development; a failed signature is an error, never a
silently unsigned image."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import c2pa
import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from engine.conditions import Condition
from engine.credentials import (
    GENERATION_ASSERTION,
    ContentCredentials,
    SigningError,
    SigningSettings,
    algorithm_for,
    make_development_credentials,
)
from engine.images import ImageWriter
from engine.sampling import SamplingOptions
from model_registry.convert import software_version
from vq_decoder.encoding import DIGITAL_SOURCE_TYPE, IMAGE_FORMATS, encode_image, read_metadata

from .helpers import read_credentials

PIXELS = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dev_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_development_credentials(tmp_path_factory.mktemp("c2pa"))


@pytest.fixture(scope="module")
def writer(tiny_model, dev_files) -> ImageWriter:
    options = SamplingOptions.resolve("c2i", seed=7)
    return ImageWriter(tiny_model, options, credentials=ContentCredentials.from_files(*dev_files))


@pytest.mark.parametrize("fmt", list(IMAGE_FORMATS))
def test_every_format_is_signed_and_validates(writer, tiny_model, fmt):
    signed = dataclasses.replace(writer, format=fmt).encode(
        PIXELS, Condition(label=3), 7)
    state, manifest = read_credentials(signed, fmt)
    assert state == "Valid"  # signature and content hash good; the dev signer is untrusted
    assertions = {a["label"].removesuffix(".v2"): a["data"] for a in manifest["assertions"]}
    (created,) = assertions["c2pa.actions"]["actions"]
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert created["softwareAgent"]["name"] == f"llamagen-serve/{software_version()}"
    record = assertions[GENERATION_ASSERTION]
    assert record["model"] == tiny_model.name and record["seed"] == 7
    assert record["checkpoint_sha256"] == tiny_model.gpt_sha256
    assert record["class_label"] == 3 and record["sampling"]["cfg_scale"] == 4.0
    assert record["created"]
    # The unsigned metadata stays, with the same record.
    unsigned = read_metadata(signed)
    assert unsigned["xmp_digital_source_type"] == DIGITAL_SOURCE_TYPE
    assert {k: unsigned[k] for k in record} == record


@pytest.mark.parametrize("fmt", list(IMAGE_FORMATS))
def test_one_changed_pixel_byte_is_a_hash_mismatch(writer, fmt):
    plain = encode_image(PIXELS, fmt)  # type: ignore[arg-type]
    signed = dataclasses.replace(writer, format=fmt).encode(
        PIXELS, Condition(label=1), 1)
    # Bytes from the middle of the compressed pixel data (IDAT, JPEG scan, VP8 chunk).
    at = signed.find(plain[len(plain) // 2: len(plain) // 2 + 16])
    assert at > 0
    tampered = bytearray(signed)
    tampered[at + 8] ^= 0x01
    reader = c2pa.Reader(IMAGE_FORMATS[fmt].media_type, io.BytesIO(bytes(tampered)))
    failures = [f["code"] for f in reader.get_validation_results()["activeManifest"]["failure"]]
    assert reader.get_validation_state() == "Invalid"
    assert "assertion.dataHash.mismatch" in failures


def test_development_credentials_are_made_once_and_say_untrusted(tmp_path):
    chain, key = make_development_credentials(tmp_path)
    assert make_development_credentials(tmp_path) == (chain, key)
    first = chain.read_bytes()
    make_development_credentials(tmp_path)
    assert chain.read_bytes() == first  # reused, not remade
    assert b"BEGIN CERTIFICATE" in first and (tmp_path / "ca.pem").is_file()
    from cryptography import x509

    signer = x509.load_pem_x509_certificates(first)[0]
    assert "UNTRUSTED" in signer.subject.rfc4514_string()
    assert key.stat().st_mode & 0o077 == 0


def test_settings_choose_files_development_or_nothing(tmp_path, dev_files):
    chain, key = dev_files
    assert ContentCredentials.from_settings(SigningSettings(c2pa=False)) is None
    given = ContentCredentials.from_settings(SigningSettings(c2pa_cert=chain, c2pa_key=key,
                                                             c2pa_dir=tmp_path / "unused"))
    assert given is not None and not (tmp_path / "unused").exists()
    made = ContentCredentials.from_settings(SigningSettings(c2pa_dir=tmp_path / "dev"))
    assert made is not None and (tmp_path / "dev" / "signer-key.pem").is_file()
    with pytest.raises(SigningError, match="both"):
        ContentCredentials.from_settings(SigningSettings(c2pa_cert=chain))
    with pytest.raises(SigningError):
        ContentCredentials.from_settings(SigningSettings(c2pa_cert=chain,
                                                         c2pa_key=tmp_path / "missing.pem"))


def test_the_algorithm_follows_the_key():
    assert algorithm_for(ec.generate_private_key(ec.SECP256R1())) == "ES256"
    assert algorithm_for(ec.generate_private_key(ec.SECP384R1())) == "ES384"
    assert algorithm_for(rsa.generate_private_key(65537, 2048)) == "PS256"
    assert algorithm_for(ed25519.Ed25519PrivateKey.generate()) == "ED25519"
    with pytest.raises(SigningError):
        algorithm_for(ec.generate_private_key(ec.SECP256K1()))


def test_a_callback_signer_signs(tiny_model, dev_files):
    """The KMS/HSM hook: the key never leaves the callback."""
    chain, key_file = dev_files
    key = load_pem_private_key(key_file.read_bytes(), password=None)
    calls = []

    def sign(data: bytes) -> bytes:
        calls.append(len(data))
        return key.sign(data, ec.ECDSA(hashes.SHA256()))

    credentials = ContentCredentials.from_callback(sign, chain.read_text(), "ES256")
    signed = ImageWriter(tiny_model, SamplingOptions(), "jpeg", credentials=credentials).encode(
        PIXELS, Condition(label=0), 0)
    assert calls and read_credentials(signed, "jpeg")[0] == "Valid"


def test_a_failed_signature_fails_the_image(tiny_model, dev_files):
    def broken(data: bytes) -> bytes:
        raise RuntimeError("HSM unreachable")

    credentials = ContentCredentials.from_callback(broken, dev_files[0].read_text(), "ES256")
    writer = ImageWriter(tiny_model, SamplingOptions(), credentials=credentials)
    with pytest.raises(SigningError):
        writer.encode(PIXELS, Condition(label=0), 0)


def test_unsigned_when_signing_is_off(tiny_model):
    data = ImageWriter(tiny_model, SamplingOptions()).encode(PIXELS, Condition(label=0), 0)
    with pytest.raises(c2pa.C2paError):
        c2pa.Reader("image/png", io.BytesIO(data))
