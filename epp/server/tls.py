"""TLS for the gRPC server: a certificate from --cert-path, or a self-signed one made at start."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
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
    host, _, port = target.rpartition(":")
    return ssl.get_server_certificate((host or "127.0.0.1", int(port))).encode()


# The reference's --tls-min-version values (Go crypto/tls names).
TLS_VERSIONS = {"VersionTLS10": ssl.TLSVersion.TLSv1, "VersionTLS11": ssl.TLSVersion.TLSv1_1,
                "VersionTLS12": ssl.TLSVersion.TLSv1_2, "VersionTLS13": ssl.TLSVersion.TLSv1_3}
# Go crypto/tls cipher suite names -> OpenSSL names (TLS 1.2 and below; like Go, the TLS 1.3
# suites are accepted and always enabled: they cannot be configured).
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
}
TLS13_SUITES = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"})


@dataclass(frozen=True, slots=True)
class TLSPolicy:
    """--tls-min-version and --tls-cipher-suites, checked when the flags are read."""

    min_version: str = "VersionTLS12"
    cipher_suites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.min_version not in TLS_VERSIONS:
            raise ValueError(f"--tls-min-version: unknown TLS version {self.min_version!r}; supported values: "
                             f"{', '.join(TLS_VERSIONS)}")
        for name in self.cipher_suites:
            if name not in CIPHER_SUITES and name not in TLS13_SUITES:
                raise ValueError(f"--tls-cipher-suites: unknown or unsupported cipher suite {name!r} (epp knows: "
                                 f"{', '.join(sorted(CIPHER_SUITES))}, and the TLS 1.3 suites)")

    def apply(self, ctx: ssl.SSLContext) -> None:
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        chosen = [CIPHER_SUITES[n] for n in self.cipher_suites if n in CIPHER_SUITES]
        if chosen:
            ctx.set_ciphers(":".join(chosen))
