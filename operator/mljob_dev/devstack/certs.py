"""Certificates for the local stack: the kube-apiserver's CA, serving cert, admin client cert and
service-account signing key, and NATS's own CA and serving cert. Generated in Python so no
openssl/cfssl is needed."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ClusterCerts:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_private_key: Path
    sa_public_key: Path
    #: The node's kubelet: its client identity (the Node authorizer's system:node:<name>) and
    #: the serving cert the apiserver dials for logs and exec.
    node_cert: Path
    node_key: Path
    kubelet_serving_cert: Path
    kubelet_serving_key: Path

    @classmethod
    def at(cls, directory: Path) -> ClusterCerts:
        """Where `generate` writes them (the node reads the stack's PKI from here)."""
        return cls(
            ca_cert=directory / "ca.crt",
            serving_cert=directory / "apiserver.crt",
            serving_key=directory / "apiserver.key",
            admin_cert=directory / "admin.crt",
            admin_key=directory / "admin.key",
            sa_private_key=directory / "sa.key",
            sa_public_key=directory / "sa.pub",
            node_cert=directory / "node.crt",
            node_key=directory / "node.key",
            kubelet_serving_cert=directory / "kubelet.crt",
            kubelet_serving_key=directory / "kubelet.key",
        )


#: The local node's name: its only address is loopback, which the kubelet accepts as a node
#: address only when the node is named by it (`--hostname-override`).
NODE_NAME = "127.0.0.1"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool = False,
    usages: list[x509.ObjectIdentifier] | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if is_ca:
        builder = builder.add_extension(
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
    return builder.sign(ca_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def generate(directory: Path) -> ClusterCerts:
    """Write a fresh CA and the certificates the apiserver and its admin client need."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("mljob-local-ca")
    ca = _issue(ca_name, ca_key, ca_name, ca_key, is_ca=True)

    serving_key = ec.generate_private_key(ec.SECP256R1())
    serving = _issue(
        _name("kube-apiserver"),
        serving_key,
        ca_name,
        ca_key,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=[
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes.default.svc"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
    )
    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin = _issue(
        _name("mljob-admin", "system:masters"),
        admin_key,
        ca_name,
        ca_key,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = _issue(
        _name(f"system:node:{NODE_NAME}", "system:nodes"),
        node_key,
        ca_name,
        ca_key,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    kubelet_key = ec.generate_private_key(ec.SECP256R1())
    kubelet = _issue(
        _name(NODE_NAME),
        kubelet_key,
        ca_name,
        ca_key,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(NODE_NAME))],
    )

    certs = ClusterCerts.at(directory)
    _write_cert(certs.ca_cert, ca)
    _write_cert(certs.serving_cert, serving)
    _write_key(certs.serving_key, serving_key)
    _write_cert(certs.admin_cert, admin)
    _write_key(certs.admin_key, admin_key)
    _write_key(certs.sa_private_key, sa_key)
    _write_cert(certs.node_cert, node)
    _write_key(certs.node_key, node_key)
    _write_cert(certs.kubelet_serving_cert, kubelet)
    _write_key(certs.kubelet_serving_key, kubelet_key)
    certs.sa_public_key.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return certs


@dataclass(frozen=True)
class ServingCerts:
    """A CA (what clients trust) and the server certificate and key it signed."""

    ca_cert: Path
    cert: Path
    key: Path


def generate_serving(directory: Path, common_name: str) -> ServingCerts:
    """Write a CA of its own and a serving cert for 127.0.0.1/localhost (NATS's `tls://` URLs).

    A CA separate from the apiserver's, because NATS starts before the apiserver's PKI exists
    and a client trusting NATS has no reason to trust the apiserver.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{common_name}-ca")
    ca = _issue(ca_name, ca_key, ca_name, ca_key, is_ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(
        _name(common_name),
        key,
        ca_name,
        ca_key,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    certs = ServingCerts(
        ca_cert=directory / "ca.crt", cert=directory / "server.crt", key=directory / "server.key"
    )
    _write_cert(certs.ca_cert, ca)
    _write_cert(certs.cert, cert)
    _write_key(certs.key, key)
    return certs
