"""How a bacq process authenticates to NATS: credentials, TLS and its role's inbox prefix.

Touches the environment (``BACQ_NATS_*``) and reads the files it names (creds, nkey seed, TLS
certificates); it opens no connection itself, ``bacq.bus.Bus.connect`` does. Every process has a
role (client, requester, verifier, worker) and uses the inbox prefix ``_INBOX.<role>``, so that the
server's permissions (deploy/nats/bacq.conf) can let each role read only its own replies: the
verifier's JetStream deliveries (result CIDs) arrive on its inbox, which no worker may subscribe to.

Settings (flags of the ``bacq`` command set the same variables):

    BACQ_NATS_USER, BACQ_NATS_PASSWORD    user and password
    BACQ_NATS_TOKEN                        a token
    BACQ_NATS_CREDS                        a NATS .creds file (JWT + nkey seed)
    BACQ_NATS_NKEY                         a file holding an nkey seed (SU...)
    BACQ_NATS_TLS_CA                       CA bundle to verify the server (enables TLS)
    BACQ_NATS_TLS_CERT, BACQ_NATS_TLS_KEY  client certificate and key (mutual TLS)
    BACQ_NATS_INBOX_PREFIX                 overrides ``_INBOX.<role>``

Password and token may also be given as files: ``BACQ_NATS_PASSWORD_FILE``, ``BACQ_NATS_TOKEN_FILE``
(for systemd's ``LoadCredential=``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bacq.errors import ConfigError

if TYPE_CHECKING:
    import ssl  # imported when a TLS context is made: the CLI's quick commands need none

__all__ = ["ROLES", "NatsOptions", "new_user_nkey"]

ROLES = ("client", "requester", "verifier", "worker")
ENV = {
    "user": "BACQ_NATS_USER",
    "password": "BACQ_NATS_PASSWORD",
    "token": "BACQ_NATS_TOKEN",
    "creds": "BACQ_NATS_CREDS",
    "nkey": "BACQ_NATS_NKEY",
    "tls_ca": "BACQ_NATS_TLS_CA",
    "tls_cert": "BACQ_NATS_TLS_CERT",
    "tls_key": "BACQ_NATS_TLS_KEY",
    "inbox_prefix": "BACQ_NATS_INBOX_PREFIX",
}


def _read_secret(path: str, what: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the NATS {what} file {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class NatsOptions:
    """Connection options for one role; ``connect_kwargs()`` gives nats-py's arguments."""

    role: str = "client"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    nkey: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    inbox_prefix: str | None = None

    @classmethod
    def from_env(cls, role: str, env: Mapping[str, str] | None = None) -> NatsOptions:
        env = os.environ if env is None else env
        values: dict[str, str | None] = {key: env.get(var) or None for key, var in ENV.items()}
        for key in ("password", "token"):
            file = env.get(f"{ENV[key]}_FILE")
            if values[key] is None and file:
                values[key] = _read_secret(file, key)
        return cls(role=role, **values)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"unknown NATS role {self.role!r}; one of {', '.join(ROLES)}")
        if bool(self.user) != bool(self.password):
            raise ConfigError("NATS user and password go together (BACQ_NATS_USER/_PASSWORD)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("a TLS client certificate needs its key (BACQ_NATS_TLS_CERT/_KEY)")
        ways = [bool(self.user), bool(self.token), bool(self.creds), bool(self.nkey)]
        if sum(ways) > 1:
            raise ConfigError("give one NATS credential: user/password, token, creds or nkey")
        for what, path in (("creds", self.creds), ("nkey", self.nkey)):
            if path and not Path(path).is_file():
                raise ConfigError(f"the NATS {what} file {path} does not exist")

    @property
    def inbox(self) -> str:
        return self.inbox_prefix or f"_INBOX.{self.role}"

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        import ssl

        try:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert and self.tls_key:
                context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the NATS TLS files: {exc}") from None
        return context

    def connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"inbox_prefix": self.inbox}
        if self.user:
            kwargs.update(user=self.user, password=self.password)
        if self.token:
            kwargs["token"] = self.token
        if self.creds:
            kwargs["user_credentials"] = self.creds
        if self.nkey:
            kwargs["nkeys_seed"] = self.nkey
        tls = self.tls_context()
        if tls is not None:
            kwargs["tls"] = tls
        return kwargs

    def describe(self) -> str:
        """How this connects, without secrets (for error messages)."""
        how = (
            f"user {self.user}"
            if self.user
            else "a token"
            if self.token
            else f"creds {self.creds}"
            if self.creds
            else f"nkey {self.nkey}"
            if self.nkey
            else "no credentials"
        )
        return how + (", TLS" if self.tls_ca or self.tls_cert else "")


def new_user_nkey() -> tuple[str, str]:
    """A fresh user nkey: (seed for the client's file, public key for the server's config)."""
    import nkeys  # nats-py[nkeys]

    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public: bytes = nkeys.from_seed(bytearray(seed)).public_key
    return seed.decode(), public.decode()


if __name__ == "__main__":  # python -m bacq.auth nkey: print a new user seed and public key
    if sys.argv[1:] != ["nkey"]:
        sys.exit("usage: python -m bacq.auth nkey   (prints a user nkey seed, then its public key)")
    seed, public = new_user_nkey()
    print(seed)
    print(public)
