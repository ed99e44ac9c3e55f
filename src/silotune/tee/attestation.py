"""Enclave attestation: a quote binds the enclave's measurement to its ephemeral key-exchange key.

Before a client sends anything to an enclave (TEE mode), the enclave proves two things:

- *what it runs*: its **measurement**, SHA-256 over the enclave's code files (with their relative
  paths) and a canonical JSON of its configuration (``measurement``, ``enclave_code_files``);
- *that the key the client exchanges keys with is its own and was made for this handshake*: the
  quote's 32-byte **report data** is SHA-256 over a label, the enclave's ephemeral X25519 public key
  and the client's challenge nonce (``report_data``; in the handshake the challenge is the nonce of
  the client's hello).

A platform signs (backend, measurement, report data) into a ``Quote``. ``verify_quote`` checks it
against the measurement the client expects, the server hello's ephemeral key and the client's own
nonce, and refuses (``AttestationError``): another backend's quote, a quote the trusted platform did
not sign, an enclave running other code or configuration, a quote over another key (a host that put
its own key in the hello) and a quote made for an earlier challenge (a replay). The client's session
keys then derive from an exchange with the enclave's ephemeral key, so they exist only inside the
enclave; the host relays ciphertext. In ``crypto.handshake`` the enclave passes an ``Attester`` to
``server_accept(..., enclave=...)`` (it must run inside the enclave, which keeps the ephemeral
secret) and the client an ``AttestationPolicy`` to ``ClientHandshake(..., attestation=...)``.

Backends. An ``AttestationBackend`` makes quotes and a ``Verifier`` checks them; the interface needs
only a measurement and 32 bytes of report data, which every TEE can carry.

- ``SimulatedBackend``, the only one shipped: the "enclave" is a separate OS process and its quotes
  are signed by a local Ed25519 platform key. It gives NO hardware protection: whoever runs the host
  can read the enclave's memory, and whoever holds the platform key can sign any quote. It exercises
  the protocol and protects nothing from the server's operator; ``hardware_protection`` is False,
  ``describe()`` says so and a client that accepts such a quote logs a warning.
- A real backend brings its own pair and sets ``hardware_protection = True``; ``Quote.signature``
  then carries the platform's evidence (at most ``MAX_EVIDENCE`` bytes), and its ``Verifier`` must
  check that the evidence is genuine and attests exactly the quote's ``measurement`` and
  ``report_data``. Intel SGX (e.g. under Gramine): the enclave writes the report data into the
  REPORTDATA of its DCAP quote (Gramine: ``/dev/attestation/user_report_data``, then read
  ``/dev/attestation/quote``); the verifier checks the quote's chain to Intel's root (PCK
  certificates, TCB level, revocation; a DCAP quote verification library) and compares MRENCLAVE.
  Intel TDX: REPORTDATA of a TD quote, MRTD/RTMRs as the measurement, the same DCAP chain. AMD
  SEV-SNP: REPORT_DATA of the attestation report, its MEASUREMENT, signed by the VCEK chained to
  AMD's ARK/ASK. None of these is shipped or tested here.

What the measurement covers: the files ``enclave_code_files()`` lists and the configuration; not the
interpreter or third-party packages (``cryptography``, torch). A hardware measurement covers the whole
enclave image (Gramine's manifest hashes every trusted file), which is where those belong.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..atomic import atomic_write
from ..crypto.identity import CryptoError, fingerprint, load_ed25519_key, raw_public, verify

log = logging.getLogger(__name__)

MEASUREMENT_LABEL = b"silotune-enclave-measurement-v1"
REPORT_LABEL = b"silotune-attestation-report-v1"
SIMULATED_QUOTE_LABEL = b"silotune-simulated-quote-v1"
QUOTE_MAGIC = b"STQ1"
DIGEST = 32  # bytes of a measurement and of report data (SHA-256)
MAX_BACKEND_NAME = 32
MAX_EVIDENCE = 64 * 1024  # a real platform's evidence (an SGX DCAP quote with its certificates) fits
MAX_QUOTE = len(QUOTE_MAGIC) + 1 + MAX_BACKEND_NAME + 2 * DIGEST + 4 + MAX_EVIDENCE
_BACKEND_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")

SILOTUNE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the silotune package
# Modules outside silotune.tee that an enclave imports and runs (the import closure of the handshake and
# the AEAD sessions, whose keys live in the enclave), relative to SILOTUNE_ROOT. Add a module here when
# the enclave starts running it.
ENCLAVE_MODULES = (
    "silotune/__init__.py",
    "silotune/errors.py",
    "silotune/atomic.py",
    "silotune/crypto/__init__.py",
    "silotune/crypto/identity.py",
    "silotune/crypto/handshake.py",
    "silotune/crypto/session.py",
    "silotune/protocol/__init__.py",  # the enclave decodes what clients seal
    "silotune/protocol/codec.py",
    "silotune/protocol/messages.py",
    "silotune/server/boundary.py",  # and checks it
    "silotune/server/runtime.py",  # the trunk's pass, backward and optimizer step
    "silotune/server/aggregation.py",  # the clients' FedAvg
    "silotune/train/optim.py",
    "silotune/compute.py",
    "silotune/adapters/__init__.py",
    "silotune/adapters/lora.py",
    "silotune/adapters/prefix.py",
    "silotune/adapters/spf.py",
    "silotune/models/arch.py",
    "silotune/models/loading.py",
    "silotune/models/masks.py",
    "silotune/models/partition.py",
)


class AttestationError(CryptoError):
    """A quote that is malformed, from another backend, not signed by the trusted platform, made by an
    enclave running other code or configuration, or not bound to this handshake's key and challenge."""


def _framed(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def enclave_code_files() -> list[Path]:
    """The source files an enclave runs: every module of the ``silotune.tee`` package, then ``ENCLAVE_MODULES``."""
    tee = Path(__file__).resolve().parent
    return sorted(tee.rglob("*.py")) + [SILOTUNE_ROOT / m for m in ENCLAVE_MODULES]


def measurement(code_files: Iterable[str | os.PathLike], config: dict,
                root: str | os.PathLike | None = None) -> bytes:
    """SHA-256 over the code files (each with its path relative to ``root``, default ``SILOTUNE_ROOT``, in order
    of that path, so the order they are listed in does not matter) and the canonical JSON of ``config``."""
    root = Path(SILOTUNE_ROOT if root is None else root).resolve()
    files: dict[str, bytes] = {}
    for name in code_files:
        path = Path(name).resolve()
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            raise AttestationError(f"cannot measure {name}: not under {root}") from None
        if rel in files:
            raise AttestationError(f"cannot measure the enclave: {rel} is listed twice")
        try:
            files[rel] = path.read_bytes()
        except OSError as exc:
            raise AttestationError(f"cannot measure {name}: {exc.strerror or exc}") from None
    if not files:
        raise AttestationError("cannot measure an enclave without code files")
    if not isinstance(config, dict):
        raise AttestationError(f"enclave configuration must be a dict, not {type(config).__name__}")
    try:
        canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                               allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise AttestationError(f"enclave configuration is not plain JSON ({exc})") from None
    digest = hashlib.sha256(MEASUREMENT_LABEL + struct.pack(">Q", len(files)))
    for rel in sorted(files):
        digest.update(_framed(rel.encode()) + _framed(files[rel]))
    digest.update(_framed(canonical))
    return digest.digest()


def report_data(ephemeral_public: bytes, challenge: bytes) -> bytes:
    """The 32 bytes a quote carries: SHA-256 over a label, the enclave's ephemeral X25519 key and the challenge."""
    if not isinstance(ephemeral_public, bytes) or len(ephemeral_public) != 32:
        raise AttestationError("report data: the ephemeral key must be 32 bytes (raw X25519)")
    if not isinstance(challenge, bytes) or not 16 <= len(challenge) <= 64:
        raise AttestationError("report data: the challenge must be 16 to 64 bytes")
    return hashlib.sha256(REPORT_LABEL + _framed(ephemeral_public) + _framed(challenge)).digest()


@dataclass(frozen=True)
class Quote:
    """A platform's statement that an enclave with ``measurement`` produced ``report_data``.

    ``signature`` is the platform's signature (simulated: Ed25519 over ``signed_part``) or, for a real
    backend, its evidence. Every Quote is well formed: a malformed one raises AttestationError.

    Wire form: ``STQ1`` | name length (1 byte) | backend name | measurement (32) | report data (32) |
    signature length (4 bytes, big-endian) | signature; nothing after it."""

    backend: str
    measurement: bytes
    report_data: bytes
    signature: bytes

    def __post_init__(self):
        if (not isinstance(self.backend, str) or len(self.backend) > MAX_BACKEND_NAME
                or not _BACKEND_NAME.fullmatch(self.backend)):
            raise AttestationError(f"malformed quote: backend name {self.backend!r} is not 1 to {MAX_BACKEND_NAME} "
                                   "characters of a-z, 0-9 and '-'")
        for field in ("measurement", "report_data"):
            value = getattr(self, field)
            if not isinstance(value, bytes) or len(value) != DIGEST:
                raise AttestationError(f"malformed quote: {field} must be {DIGEST} bytes")
        if not isinstance(self.signature, bytes) or len(self.signature) > MAX_EVIDENCE:
            raise AttestationError(f"malformed quote: signature must be bytes, at most {MAX_EVIDENCE}")

    def signed_part(self) -> bytes:
        """What a simulated platform signs: the label, the backend name, the measurement and the report data."""
        return SIMULATED_QUOTE_LABEL + _framed(self.backend.encode()) + self.measurement + self.report_data

    def to_bytes(self) -> bytes:
        name = self.backend.encode()
        return (QUOTE_MAGIC + bytes([len(name)]) + name + self.measurement + self.report_data
                + struct.pack(">I", len(self.signature)) + self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> Quote:
        """Parse a quote strictly; AttestationError for anything but exactly one well-formed quote."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise AttestationError(f"malformed quote: expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_QUOTE:
            raise AttestationError(f"malformed quote: {len(data)} bytes, at most {MAX_QUOTE}")
        if data[:len(QUOTE_MAGIC)] != QUOTE_MAGIC:
            raise AttestationError("malformed quote: not a SiloTune quote (bad magic)")
        pos = len(QUOTE_MAGIC)

        def take(n: int, what: str) -> bytes:
            nonlocal pos
            if pos + n > len(data):
                raise AttestationError(f"malformed quote: truncated in the {what}")
            pos += n
            return data[pos - n:pos]

        name_length = take(1, "backend name length")[0]
        try:
            backend = take(name_length, "backend name").decode("ascii")
        except UnicodeDecodeError:
            raise AttestationError("malformed quote: backend name is not ASCII") from None
        measured = take(DIGEST, "measurement")
        report = take(DIGEST, "report data")
        (signature_length,) = struct.unpack(">I", take(4, "signature length"))
        if signature_length > MAX_EVIDENCE:
            raise AttestationError(f"malformed quote: signature of {signature_length} bytes, at most {MAX_EVIDENCE}")
        signature = take(signature_length, "signature")
        if pos != len(data):
            raise AttestationError(f"malformed quote: {len(data) - pos} bytes after its end")
        return cls(backend, measured, report, signature)


class AttestationBackend(ABC):
    """Makes quotes inside an enclave. On a real TEE (SGX, TDX, SEV-SNP) the hardware measures the enclave
    itself, and ``quote`` must fail unless that measurement is the one ``measurement`` stands for."""

    name: str
    hardware_protection: bool

    @abstractmethod
    def quote(self, measurement: bytes, report_data: bytes) -> Quote:
        """A quote that this platform's enclave with ``measurement`` produced ``report_data``."""

    @abstractmethod
    def describe(self) -> str:
        """One line saying what this backend protects, and from whom."""

    @abstractmethod
    def sealing_key(self, measurement: bytes) -> bytes:
        """A 32-byte key only an enclave with ``measurement`` on this platform can obtain (SGX: ``EGETKEY`` with
        the MRENCLAVE policy; TDX / SEV-SNP: a key derived by the platform for the measured guest): what
        the enclave's state is sealed under when it leaves the enclave (``tee/sealing.py``)."""


class Verifier(ABC):
    """Checks the platform evidence of quotes from one backend (``backend``, its name)."""

    backend: str
    hardware_protection: bool

    @abstractmethod
    def verify(self, quote: Quote) -> None:
        """AttestationError unless the trusted platform vouches for exactly this quote's measurement and report
        data. ``verify_quote`` calls it after checking the backend name, then compares those two fields."""


class SimulatedBackend(AttestationBackend):
    """A simulated enclave: a separate OS process whose quotes a local Ed25519 platform key signs.

    No hardware protection: the host's operator can read its memory and, with the platform key, sign any
    quote. The key is generated, or kept in a PEM file written and checked like identity keys (mode 0600)."""

    name = "simulated"
    hardware_protection = False

    def __init__(self, platform_key: Ed25519PrivateKey | None = None):
        self._key = Ed25519PrivateKey.generate() if platform_key is None else platform_key

    @classmethod
    def generate(cls) -> SimulatedBackend:
        return cls()

    @property
    def public_key(self) -> bytes:
        """The platform's raw Ed25519 public key: what a client's ``SimulatedVerifier`` trusts."""
        return raw_public(self._key.public_key())

    def verifier(self) -> SimulatedVerifier:
        return SimulatedVerifier(self.public_key)

    def raw_private_key(self) -> bytes:
        """The platform key's raw bytes, to hand to the enclave process it stands for (never to a client)."""
        return self._key.private_bytes_raw()

    def sealing_key(self, measurement: bytes) -> bytes:
        """HKDF-SHA256 of the platform key, for this measurement (whoever holds the platform key can derive it)."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"silotune-sealing-v1|" + measurement).derive(self.raw_private_key())

    def describe(self) -> str:
        return ("simulated enclave: separate OS process, no hardware protection (quotes signed by the local "
                f"platform key {fingerprint(self.public_key)}; the host's operator can read the enclave's memory)")

    def quote(self, measurement: bytes, report_data: bytes) -> Quote:
        unsigned = Quote(self.name, measurement, report_data, b"")
        return Quote(self.name, measurement, report_data, self._key.sign(unsigned.signed_part()))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), mode=0o600)

    @classmethod
    def load(cls, path: str | os.PathLike, allow_insecure: bool = False) -> SimulatedBackend:
        """The platform key in a PEM file; its permissions are checked like every private key file's
        (``crypto.identity.check_private_key``)."""
        return cls(load_ed25519_key(path, "simulated platform key", allow_insecure, AttestationError))


class SimulatedVerifier(Verifier):
    """Trusts quotes signed by one simulated platform key (raw Ed25519 public key)."""

    backend = SimulatedBackend.name
    hardware_protection = False

    def __init__(self, platform_public_key: bytes):
        try:
            Ed25519PublicKey.from_public_bytes(platform_public_key)
        except (ValueError, TypeError):
            raise AttestationError("simulated platform public key: expected 32 raw Ed25519 bytes") from None
        self.platform_public_key = bytes(platform_public_key)

    def verify(self, quote: Quote) -> None:
        if not verify(self.platform_public_key, quote.signature, quote.signed_part()):
            raise AttestationError("quote: bad platform signature (not signed by the trusted simulated platform key "
                                   f"{fingerprint(self.platform_public_key)}), or tampered")


def verify_quote(quote: Quote, verifier: Verifier, expected_measurement: bytes, ephemeral_public: bytes,
                 challenge: bytes) -> None:
    """Accept ``quote`` only if it comes from the verifier's backend, the platform vouches for it, its
    measurement is ``expected_measurement`` and its report data binds ``ephemeral_public`` and ``challenge``;
    AttestationError otherwise."""
    if not isinstance(quote, Quote):
        raise AttestationError(f"expected a Quote, got {type(quote).__name__}")
    if not isinstance(expected_measurement, bytes) or len(expected_measurement) != DIGEST:
        raise AttestationError(f"expected measurement must be {DIGEST} bytes")
    if quote.backend != verifier.backend:
        raise AttestationError(f"quote from backend {quote.backend!r}, but this client trusts only "
                               f"{verifier.backend!r} quotes")
    verifier.verify(quote)
    if not hmac.compare_digest(quote.measurement, expected_measurement):
        raise AttestationError(f"enclave measurement {quote.measurement.hex()[:16]}... is not the expected "
                               f"{expected_measurement.hex()[:16]}...: the enclave runs other code or configuration")
    if not hmac.compare_digest(quote.report_data, report_data(ephemeral_public, challenge)):
        raise AttestationError("quote's report data does not bind this ephemeral key and this challenge: a quote "
                               "over a different key, or a replayed quote (made for an earlier challenge)")


@dataclass(frozen=True)
class Attester:
    """The enclave's side of attestation: its backend and its own measurement (``server_accept``'s ``enclave``)."""

    backend: AttestationBackend
    measurement: bytes

    @classmethod
    def for_enclave(cls, backend: AttestationBackend, config: dict,
                    code_files: Iterable[str | os.PathLike] | None = None) -> Attester:
        """Measure this enclave's code (default ``enclave_code_files()``) and ``config``."""
        return cls(backend, measurement(enclave_code_files() if code_files is None else code_files, config))

    def quote(self, ephemeral_public: bytes, challenge: bytes) -> Quote:
        """A quote over this enclave's ephemeral key for a client's challenge."""
        return self.backend.quote(self.measurement, report_data(ephemeral_public, challenge))


@dataclass
class AttestationPolicy:
    """The client's side (``ClientHandshake``'s ``attestation``): whom it trusts to vouch for enclaves, and
    the measurement of the enclave it is willing to talk to."""

    verifier: Verifier
    expected_measurement: bytes

    def check(self, quote: bytes, ephemeral_public: bytes, challenge: bytes) -> Quote:
        """The parsed quote, once ``verify_quote`` accepts it; AttestationError (also when there is none)."""
        if not quote:
            raise AttestationError("server hello carries no enclave quote, but this client requires attestation")
        parsed = Quote.from_bytes(quote)
        verify_quote(parsed, self.verifier, self.expected_measurement, ephemeral_public, challenge)
        if not self.verifier.hardware_protection:
            log.warning("accepted a %s enclave quote: it gives no hardware protection (the server's operator can "
                        "read the enclave's memory)", parsed.backend)
        return parsed
