"""Certificates for the TLS tests, made fresh in a test's directory with `cryptography`.

Two independent CAs (the right one and a wrong one), each able to issue
server certificates (for 127.0.0.1 and localhost) and client certificates
(with a CommonName), valid now or already expired.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as PEM files."""

    cert: str
    key: str


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    with open(path, "wb") as file:
        file.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def _write_cert(path: str, cert: x509.Certificate) -> None:
    with open(path, "wb") as file:
        file.write(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Authority:
    """A CA that writes its certificate and the certificates it issues under `directory`."""

    def __init__(self, directory: str, name: str) -> None:
        self.directory = directory
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"pykine test CA {name}"))
            .issuer_name(_name(f"pykine test CA {name}"))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert = os.path.join(directory, f"ca-{name}.pem")
        _write_cert(self.cert, self._cert)

    def issue(self, file_name: str, common_name: str, server: bool, expired: bool = False) -> Pair:
        """A leaf certificate: for the loopback server names, or for a client called `common_name`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        if expired:
            valid = (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
        else:
            valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(LOOPBACK_NAMES), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        pair = Pair(os.path.join(self.directory, f"{file_name}.pem"), os.path.join(self.directory, f"{file_name}.key"))
        _write_cert(pair.cert, cert)
        _write_key(pair.key, key)
        return pair


def common_name(pem_or_der: bytes) -> str:
    """The subject CommonName of a certificate, PEM or DER."""
    if pem_or_der.startswith(b"-----"):
        cert = x509.load_pem_x509_certificate(pem_or_der)
    else:
        cert = x509.load_der_x509_certificate(pem_or_der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
