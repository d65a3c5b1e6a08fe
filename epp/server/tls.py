"""TLS for the gRPC server: a certificate from --cert-path, or a self-signed one made at start."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(hostnames: tuple[str, ...] = ("localhost",)) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) valid for ten years."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "epp")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    alt: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def load_cert_dir(path: str) -> tuple[bytes, bytes]:
    """tls.key + tls.crt from a directory (the layout of a Kubernetes TLS secret)."""
    d = Path(path)
    key, crt = d / "tls.key", d / "tls.crt"
    missing = [str(p) for p in (key, crt) if not p.is_file()]
    if missing:
        raise ValueError(f"--cert-path {path}: missing {', '.join(missing)}")
    return key.read_bytes(), crt.read_bytes()


def fetch_server_cert(target: str) -> bytes:
    """The PEM certificate a TLS server presents (to trust a self-signed epp from a CLI client)."""
    import ssl

    host, _, port = target.rpartition(":")
    return ssl.get_server_certificate((host or "127.0.0.1", int(port))).encode()
