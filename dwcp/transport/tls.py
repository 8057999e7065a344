"""TLS identity: a self-signed certificate made from the node's Ed25519 key, and mutual trust.

There is no CA: a node is trusted because its public key is in the other
node's trusted set. Both sides present certificates; the check
(``quic.install_trust_check``) runs inside aioquic's TLS state machine (on the
peer's CertificateVerify / Finished message), so an untrusted or missing
certificate aborts the handshake with a TLS alert before any stream data is
accepted.
"""

from __future__ import annotations

import datetime
import ssl

from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from dwcp.identity import NodeKey, PublicKey
from dwcp.version import PROTOCOL_VERSION

ALPN = f"dwcp/{PROTOCOL_VERSION}"


class AlertCertificateRequired(tls.Alert):
    """TLS alert 116: the peer sent no certificate (aioquic does not define this one)."""

    description = tls.AlertDescription.certificate_required


def make_certificate(key: NodeKey) -> tuple[x509.Certificate, Ed25519PrivateKey]:
    """Return a long-lived self-signed certificate for ``key`` and its private key."""
    private = Ed25519PrivateKey.from_private_bytes(key.seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dwcp-{key.node_id}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC))
        .sign(private, None)
    )
    return cert, private


def certificate_public_key(cert: x509.Certificate | None) -> PublicKey | None:
    """The Ed25519 key a peer certificate carries, or None if it has none we accept."""
    if cert is None:
        return None
    try:
        pub = cert.public_key()
    except ValueError:
        return None
    if not isinstance(pub, Ed25519PublicKey):
        return None
    return PublicKey(pub.public_bytes(Encoding.Raw, PublicFormat.Raw))


def make_configuration(
    key: NodeKey,
    *,
    is_client: bool,
    alpn: str = ALPN,
    idle_timeout: float = 30.0,
    max_stream_data: int = 1 << 20,
    max_data: int = 1 << 40,
    congestion: str = "dwcp-bbr",
) -> QuicConfiguration:
    """A QUIC configuration presenting ``key``'s certificate (both roles)."""
    cert, private = make_certificate(key)
    return QuicConfiguration(
        alpn_protocols=[alpn],
        is_client=is_client,
        certificate=cert,
        private_key=private,
        # Peers are checked against the trusted key set by install_trust_check,
        # not against a CA or a host name.
        verify_mode=ssl.CERT_NONE,
        idle_timeout=idle_timeout,
        max_stream_data=max_stream_data,
        max_data=max_data,
        congestion_control_algorithm=congestion,
        max_datagram_size=1452,
    )
