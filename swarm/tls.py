"""TLS for gRPC between clients and nodes: certificates without outside tools, and credentials.

A LAN swarm shares one small certificate authority (CA): ``swarm tls-cert --out DIR --host H`` makes
``DIR/ca.crt`` + ``DIR/ca.key`` on first use and signs one certificate per node with it, naming the
node's announced host (an IP address SAN or a DNS name SAN), so clients holding ``ca.crt`` can check
that they reach a node of the swarm and that nobody reads or alters the traffic in between. ECDSA
P-256 keys; private keys are written readable by their owner only.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates are valid from a little before "now"


class TLSConfigError(ValueError):
    """A certificate, key or CA file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class CertAuthority:
    """A CA able to sign node certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
            raise TLSConfigError(f"--host {host!r} is neither an IP address nor a DNS name") from None
        return x509.DNSName(host)


def make_ca(days: float = 3650, now: dt.datetime | None = None) -> CertAuthority:
    """A new self-signed CA that may sign node certificates only (path length 0)."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"swarmlm CA {secrets.token_hex(4)}")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertAuthority(cert, key)


def issue_cert(ca: CertAuthority, hosts: Sequence[str], days: float = 365,
               now: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a node reachable as any of ``hosts`` (IPs or DNS names)."""
    if isinstance(hosts, str) or not hosts:
        raise TLSConfigError("give the node's host(s): the addresses clients dial (e.g. --host 192.168.1.11)")
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return _pem_cert(cert), _pem_key(key)


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_or_make_ca(folder: Path) -> tuple[CertAuthority, bool]:
    """The CA kept in ``folder`` (``ca.crt`` + ``ca.key``), made there if absent; and whether it is new."""
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    if cert_path.exists() != key_path.exists():
        raise TLSConfigError(f"{folder} holds only one of {CA_CERT} and {CA_KEY}; both are needed to sign")
    if cert_path.exists():
        cert = load_cert(cert_path)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise TLSConfigError(f"{key_path} is not an unencrypted PEM private key: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise TLSConfigError(f"{key_path} is not the private key of {cert_path}")
        return CertAuthority(cert, key), False
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca()
    _write(key_path, _pem_key(ca.key), private=True)
    _write(cert_path, _pem_cert(ca.cert), private=False)
    return ca, True


def write_node_cert(folder: Path, hosts: Sequence[str], name: str | None = None,
                    days: float = 365) -> tuple[Path, Path, bool]:
    """Sign a certificate for ``hosts`` with the CA in ``folder`` (made there if absent); write
    ``NAME.crt`` and ``NAME.key`` there (NAME: the first host). Returns their paths and whether the CA
    is new. Existing files are never overwritten."""
    if isinstance(hosts, str) or not hosts:
        raise TLSConfigError("give the node's host(s): the addresses clients dial (e.g. --host 192.168.1.11)")
    for host in hosts:  # bad hosts are refused before anything is written
        _san(host)
    if not days > 0:
        raise TLSConfigError(f"--days must be positive, got {days}")
    name = name or re.sub(r"[^A-Za-z0-9.-]", "_", hosts[0])
    if name in ("ca", "") or "/" in name:
        raise TLSConfigError(f"--name {name!r} is reserved, empty or a path")
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise TLSConfigError(f"{path} exists already; remove it or pick another --name")
    ca, new = load_or_make_ca(folder)
    cert, key = issue_cert(ca, hosts, days)
    _write(key_path, key, private=True)
    _write(cert_path, cert, private=False)
    return cert_path, key_path, new


def load_cert(path: str | os.PathLike) -> x509.Certificate:
    """The first PEM certificate of a file; TLSConfigError naming the file otherwise."""
    data = read_pem(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise TLSConfigError(f"{path} is not a PEM certificate: {e}") from None


def read_pem(path: str | os.PathLike, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read the TLS {what} {path}: {e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        raise TLSConfigError(f"{path} is not a PEM file (the TLS {what})")
    return data


def cert_problems(cert: x509.Certificate, host: str, now: dt.datetime | None = None) -> list[str]:
    """Why clients dialing ``host`` would refuse ``cert`` (expired, not yet valid, host not named)."""
    now, problems = now or _now(), []
    if cert.not_valid_after_utc < now:
        problems.append(f"it expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        problems.append(f"it is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        listed = [str(n) for n in names.get_values_for_type(x509.IPAddress)] + names.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        listed = []
    try:
        wanted = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        wanted = host.lower()
    if wanted not in [n.lower() for n in listed] and not any(
            n.startswith("*.") and wanted.split(".", 1)[-1] == n[2:].lower() for n in listed):
        problems.append(f"it names {', '.join(listed) or 'no host'}, not {host} (make one with swarm tls-cert --host {host})")
    return problems


def server_credentials(cert_path: str | os.PathLike, key_path: str | os.PathLike) -> grpc.ServerCredentials:
    """gRPC server credentials from a node's certificate (chain) and private key files."""
    cert, key_data = read_pem(cert_path, "certificate"), read_pem(key_path, "private key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"{key_path} is not an unencrypted PEM private key: {e}") from None
    if key.public_key() != load_cert(cert_path).public_key():
        raise TLSConfigError(f"{key_path} is not the private key of the certificate {cert_path}")
    return grpc.ssl_server_credentials([(key_data, cert)])


def host_of(address: str) -> str:
    """The host part of ``host:port`` (brackets of an IPv6 address removed)."""
    return address.rpartition(":")[0].strip("[]")
