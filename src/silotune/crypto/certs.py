"""TLS material for a deployment: a private CA and a server certificate it signs (x509 via cryptography)."""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SiloTune deployment")])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(ca, ca_key, common: str, alt: list, days: int, now):
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_tls(hosts: list[str], n_clients: int = 0, days: int = 365) -> dict[str, bytes]:
    """{'ca.crt', 'server.crt', 'server.key', 'client-K.crt', 'client-K.key' ...}: a private CA, a
    server certificate valid for ``hosts`` (names or IPs) and one client certificate per client
    (for mutual TLS)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("SiloTune CA")).issuer_name(_name("SiloTune CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    alt = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    out = {"ca.crt": ca.public_bytes(serialization.Encoding.PEM)}
    out["server.crt"], out["server.key"] = _issue(ca, ca_key, hosts[0], alt, days, now)
    for k in range(n_clients):
        out[f"client-{k}.crt"], out[f"client-{k}.key"] = _issue(ca, ca_key, f"silotune-client-{k}", [], days, now)
    return out
