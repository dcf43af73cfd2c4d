"""The requester's signing key: ed25519 from nkeys, so that a job's history proves who wrote it.

Touches the key file (``load_signer``: read it, or create it with mode 0600) and, in
``publish_requester_keys`` / ``fetch_requester_keys``, one entry of the key-value bucket
``bacq-keys`` (written by the requester only, read by clients). The rest is pure logic.

The requester makes one ``Signer`` at start from its seed file (``--signing-key FILE`` or
``BACQ_SIGNING_KEY``, else ``~/.local/state/bacq/requester/signing.nk``) and hands it to
``bacq.events.seal``; each event then carries the key id (the public key, ``N…``) that signed it
and an ed25519 signature of its hash. The requester publishes the public keys that may sign its
events (its current one, and every earlier one not retired) in ``bacq-keys``; a client trusts those
unless it pins its own with ``BACQ_REQUESTER_KEY`` (a comma-separated list), which wins. Rotation:
start the requester with a new seed file; its old key stays listed, so older events still verify,
until the operator retires it (``retire=``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import functools
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nacl.exceptions
import nacl.signing
import nats.errors
import nats.js.errors
import nkeys  # nats-py[nkeys]
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from bacq import subjects
from bacq.errors import ConfigError

__all__ = [
    "KEYS_BUCKET",
    "KEYS_ENTRY",
    "REQUESTER_KEY_ENV",
    "SIGNING_KEY_ENV",
    "PublishedKeys",
    "Signer",
    "default_key_path",
    "fetch_requester_keys",
    "load_signer",
    "parse_public_keys",
    "publish_requester_keys",
    "signature_valid",
]

SIGNING_KEY_ENV = "BACQ_SIGNING_KEY"  # the requester's seed file
REQUESTER_KEY_ENV = "BACQ_REQUESTER_KEY"  # a client's pinned public key(s), comma-separated
KEYS_BUCKET = subjects.KEYS_BUCKET  # requester writes, clients read
KEYS_ENTRY = "requester"
# what is signed: this prefix, then the event's hash (hex); so a signature means "a bacq event"
_CONTEXT = b"bacq.event.v1:"
_PUBLIC_PREFIXES = {
    nkeys.PREFIX_BYTE_SERVER: "N",
    nkeys.PREFIX_BYTE_ACCOUNT: "A",
    nkeys.PREFIX_BYTE_OPERATOR: "O",
    nkeys.PREFIX_BYTE_USER: "U",
    nkeys.PREFIX_BYTE_CLUSTER: "C",
}
_MAX_KEYS = 64  # keys listed in bacq-keys (each ~56 bytes): bounds what a client reads
_MAX_ENTRY = 16 * 1024  # bytes of the bacq-keys entry a client accepts
FETCH_TIMEOUT = 5.0  # seconds a client waits for the bacq-keys entry


def default_key_path() -> Path:
    """``$BACQ_SIGNING_KEY``, else the requester's seed file in its state directory."""
    env = os.environ.get(SIGNING_KEY_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "state" / "bacq" / "requester" / "signing.nk"


class Signer:
    """An ed25519 key pair from an nkey seed: signs event hashes, names itself by its public key."""

    def __init__(self, seed: bytes) -> None:
        try:
            self._pair = nkeys.from_seed(bytearray(seed.strip()))
            public: bytes = self._pair.public_key
        except (nkeys.NkeysError, binascii.Error, ValueError, IndexError) as exc:
            raise ConfigError(
                f"signing key: not an nkey seed ({exc}); make one with `python -m bacq.signing new"
                " FILE` or let the requester create it (remove the file)"
            ) from None
        self.key_id = public.decode()

    @classmethod
    def generate(cls) -> Signer:
        """A fresh key (a "server" nkey, ``N…``: it signs on behalf of a service)."""
        return cls(bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_SERVER)))

    @property
    def seed(self) -> bytes:
        return bytes(self._pair.seed)

    def sign_hash(self, event_hash: str) -> str:
        """The signature (base64) of one event's hash."""
        signature: bytes = self._pair.sign(_CONTEXT + event_hash.encode())
        return base64.b64encode(signature).decode()

    def __repr__(self) -> str:  # never the seed
        return f"Signer({self.key_id})"


def load_signer(path: Path | None = None, *, create: bool = True) -> Signer:
    """The requester's signer from its seed file (default: ``default_key_path()``).

    A missing file is created (mode 0600, its directory 0700) with a fresh key when ``create``;
    a file that others may read is refused, like ssh does, since whoever holds it can sign.
    """
    path = path if path is not None else default_key_path()
    try:
        info = path.stat()
    except FileNotFoundError:
        if not create:
            raise ConfigError(
                f"signing key {path} does not exist; give an nkey seed file with --signing-key"
                f" or {SIGNING_KEY_ENV}"
            ) from None
        return _create(path)
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"signing key {path} is not a file; point --signing-key at a seed file")
    if info.st_mode & 0o077:
        raise ConfigError(
            f"signing key {path} may be read by others (mode {stat.S_IMODE(info.st_mode):o});"
            f" run `chmod 600 {path}`"
        )
    return Signer(path.read_bytes()[:4096])


def _create(path: Path) -> Signer:
    signer = Signer.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:  # O_EXCL: two requesters starting at once do not overwrite each other's key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_signer(path, create=False)
    with os.fdopen(fd, "wb") as out:
        out.write(signer.seed + b"\n")
    return signer


def parse_public_keys(text: str, *, source: str = REQUESTER_KEY_ENV) -> list[str]:
    """Public nkeys from a comma- or space-separated list; a malformed one is a ConfigError."""
    keys = [k for k in text.replace(",", " ").split() if k]
    for key in keys:
        if _raw_public_key(key) is None:
            raise ConfigError(
                f"{source}: {key[:60]!r} is not an nkey public key (like N… or A…, 56"
                " characters); copy it from the requester's log or `bacq history --verify`"
            )
    if not keys:
        raise ConfigError(f"{source} is empty; give the requester's public key (N…)")
    return list(dict.fromkeys(keys))


def _raw_public_key(key: str) -> bytes | None:
    """The 32-byte ed25519 key inside a public nkey, or None when it is not one (bad prefix,
    length or checksum)."""
    if not isinstance(key, str) or len(key) != 56 or key[:1] not in _PUBLIC_PREFIXES.values():
        return None
    try:
        raw = base64.b32decode(key.encode() + b"=" * (-len(key) % 8))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 35 or raw[0] not in _PUBLIC_PREFIXES:
        return None
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if nkeys.crc16(body) != crc:
        return None
    return bytes(body[1:])


@functools.lru_cache(maxsize=_MAX_KEYS)
def _verify_key(key_id: str) -> nacl.signing.VerifyKey | None:
    raw_key = _raw_public_key(key_id)
    return nacl.signing.VerifyKey(raw_key) if raw_key is not None else None


def signature_valid(key_id: str, event_hash: str, signature: str) -> bool:
    """True when ``signature`` is ``key_id``'s signature of ``event_hash``."""
    verify_key = _verify_key(key_id)
    if verify_key is None:
        return False
    try:
        sig = base64.b64decode(signature.encode(), validate=True)
        verify_key.verify(_CONTEXT + event_hash.encode(), sig)
    except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError, TypeError):
        return False
    return True


# -- the published keys ---------------------------------------------------------------------------
@dataclass
class PublishedKeys:
    """The ``requester`` entry of ``bacq-keys``: the key the requester signs with now, and every
    key whose signatures clients should accept (``current`` included)."""

    current: str
    keys: list[str] = field(default_factory=list)
    updated_at: str = ""

    def encode(self) -> bytes:
        return json.dumps(
            {"current": self.current, "keys": self.keys, "updated_at": self.updated_at}
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> PublishedKeys:
        """Parse an entry; anything malformed is a ConfigError (the client then cannot verify)."""
        where = f"bucket {KEYS_BUCKET}, key {KEYS_ENTRY}"
        if len(data) > _MAX_ENTRY:
            raise ConfigError(f"{where}: the entry is {len(data)} bytes, more than {_MAX_ENTRY}")
        try:
            body = json.loads(data)
            current, keys = body["current"], body["keys"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{where}: not a key list ({exc})") from None
        if not isinstance(current, str) or not isinstance(keys, list) or len(keys) > _MAX_KEYS:
            raise ConfigError(f"{where}: 'current' must be a key and 'keys' a list of keys")
        checked = parse_public_keys(" ".join(str(k) for k in keys), source=where)
        if current not in checked:
            raise ConfigError(f"{where}: the current key {current[:60]!r} is not in 'keys'")
        return cls(current=current, keys=checked, updated_at=str(body.get("updated_at", "")))


async def _existing_bucket(js: JetStreamContext) -> KeyValue | None:
    try:
        return await js.key_value(KEYS_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return None


async def _ensure_bucket(js: JetStreamContext) -> KeyValue:
    from bacq.bus import ensure_bucket  # bacq.bus imports bacq.events, which imports this

    return await ensure_bucket(js, KEYS_BUCKET)


async def publish_requester_keys(
    js: JetStreamContext, signer: Signer, *, retire: Iterable[str] = ()
) -> PublishedKeys:
    """Make ``signer`` the requester's current key in ``bacq-keys``; keys listed before stay
    listed (their events still verify) unless named in ``retire``. Call once at requester start,
    before the first event is signed. Returns what was written."""
    bucket = await _ensure_bucket(js)
    keys: list[str] = []
    with contextlib.suppress(nats.js.errors.KeyNotFoundError):
        entry = await bucket.get(KEYS_ENTRY)
        if entry.value:
            keys = PublishedKeys.decode(entry.value).keys
    retired = set(retire)
    kept = [k for k in keys if k not in retired and k != signer.key_id]
    published = PublishedKeys(
        current=signer.key_id,
        keys=[signer.key_id, *kept][:_MAX_KEYS],
        updated_at=dt.datetime.now(dt.UTC).isoformat(),
    )
    await bucket.put(KEYS_ENTRY, published.encode())
    return published


async def fetch_requester_keys(js: JetStreamContext) -> PublishedKeys | None:
    """The keys the requester published, or None when it published none (no bucket, no entry:
    a requester that does not sign). Unreadable (permissions, timeout) is a ConfigError."""
    try:
        async with asyncio.timeout(FETCH_TIMEOUT):
            bucket = await _existing_bucket(js)
            if bucket is None:
                return None
            try:
                entry = await bucket.get(KEYS_ENTRY)
            except nats.js.errors.KeyNotFoundError:
                return None
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise ConfigError(
            f"cannot read the requester's signing keys from bucket {KEYS_BUCKET}"
            f" ({type(exc).__name__}); this user may lack read access to it: pin the key with"
            f" {REQUESTER_KEY_ENV} or --requester-key"
        ) from None
    return PublishedKeys.decode(entry.value or b"")


if __name__ == "__main__":  # python -m bacq.signing new FILE: make a seed file, print its key
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "new":
        sys.exit("usage: python -m bacq.signing new FILE   (writes an nkey seed, prints its key)")
    target = Path(sys.argv[2])
    if target.exists():
        sys.exit(f"{target} exists; choose another file (a key is never overwritten)")
    print(load_signer(target).key_id)
