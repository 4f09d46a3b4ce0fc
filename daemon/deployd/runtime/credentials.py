"""Credentials (issue 17): the platform's accounts, as [[credentials]] of the config.

A flow step names one (`credential = "billing-prod"`); every time its process starts, the
credential's fields — the config's (their `${VAR}` expanded at load), with the keys steps
refreshed through `emit('updateKeys', keys)` over them — are merged into the step's `cfg`,
over the step's own config, with `_account` set to the credential's name. The platform does
the same in its API (the step data a sailor reads at its start holds the account's keys and
`_account`), so a refresh reaches a step at its next start, as there.

Refreshed keys are kept in the state database encrypted with `daemon.secret_key` (Fernet);
with no key they are refused, never stored in clear. Values never go to a log, a status, a
repr or the flow's stored rows: only names do.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..config import Config, CredentialConfig
from ..errors import FlowError
from ..store.credentials import CredentialKeyStore
from ..store.db import StoreCore

log = logging.getLogger("deployd.credentials")
MAX_KEYS_BYTES = 64 * 1024  # the keys of one updateKeys, as JSON
ACCOUNT = "_account"  # the key of cfg that names the credential, as on the platform


class CredentialError(FlowError):
    """A credential cannot be used or its keys cannot be stored; the message says why."""


class Credentials:
    """The config's credentials and the keys refreshed for them."""

    def __init__(self, config: Config, store: StoreCore | None) -> None:
        self.config = config  # replaced by a reload
        self.keys = CredentialKeyStore(store) if store is not None else None

    def definition(self, name: str) -> CredentialConfig | None:
        return self.config.credential(name)

    def names(self) -> list[str]:
        return [c.name for c in self.config.credentials]

    def _fernet(self) -> Any:
        key = self.config.daemon.secret_key
        if key is None:
            return None
        from cryptography.fernet import Fernet

        return Fernet(key.get_secret_value().strip().encode("ascii"))

    def stored(self, cred: CredentialConfig) -> tuple[dict[str, Any], str | None]:
        """The refreshed keys of `cred` (decrypted; {} when none) and a warning, when some
        are stored but cannot be used (another component's, or not readable with the key)."""
        row = self.keys.get(cred.name) if self.keys is not None else None
        if row is None:
            return {}, None
        when = row["updated_at"]
        if row["component"] != cred.component:
            return {}, (
                f"the keys refreshed for credential {cred.name} at {when} were stored for "
                f"component {row['component']}, not {cred.component}: they are not used"
            )
        fernet = self._fernet()
        if fernet is None:
            return {}, (
                f"credential {cred.name} has keys refreshed at {when}, but daemon.secret_key "
                "is not set, so they cannot be read: the config's fields are used (set the "
                "key they were stored with)"
            )
        from cryptography.fernet import InvalidToken

        try:
            keys = json.loads(fernet.decrypt(row["token"]))
        except (InvalidToken, ValueError):
            return {}, (
                f"the keys refreshed for credential {cred.name} at {when} cannot be decrypted "
                "with daemon.secret_key (was the key changed?): the config's fields are used"
            )
        return (keys if isinstance(keys, dict) else {}), None

    def fields(self, name: str) -> tuple[dict[str, Any], str | None]:
        """The fields of credential `name`: the config's, refreshed keys over them; and a
        warning when refreshed keys exist but cannot be used. CredentialError if unknown."""
        cred = self.definition(name)
        if cred is None:
            raise CredentialError(self.unknown(name))
        keys, warning = self.stored(cred)
        return {**cred.fields, **keys}, warning

    def describe(self) -> list[dict[str, Any]]:
        """Every credential for `deployd credential list`: name, component, the names of
        its fields and of its refreshed keys (with when), never a value."""
        stored = self.keys.summary() if self.keys is not None else {}
        out = []
        for cred in self.config.credentials:
            row = stored.get(cred.name)
            refreshed = None
            if row is not None:
                refreshed = {
                    "fields": row["fields"],
                    "updated_at": row["updated_at"],
                    "used": row["component"] == cred.component,
                }
            out.append(
                {
                    "name": cred.name,
                    "component": cred.component,
                    "fields": sorted(cred.fields),
                    "refreshed": refreshed,
                }
            )
        return out

    def unknown(self, name: str) -> str:
        known = ", ".join(self.names()) or "none"
        return (
            f"unknown credential {name!r}: it is not a [[credentials]] of the daemon config "
            f"(known: {known})"
        )

    def cfg(
        self, name: str, component: str, config: dict[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        """A step's `config` with credential `name` merged in (its fields win, `_account` is
        its name) and a warning for the step log (None: none). A credential gone from the
        config, or given to another component since, is left out with a warning."""
        cred = self.definition(name)
        if cred is None:
            return dict(config), (
                f"credential {name!r} is no longer in the daemon config: the step started "
                "without its fields (add it back, or change the flow)"
            )
        if cred.component != component:
            return dict(config), (
                f"credential {name} is now for component {cred.component}, not {component}: "
                "the step started without its fields"
            )
        fields, warning = self.fields(name)
        return {**config, **fields, ACCOUNT: name}, warning

    def update_keys(self, name: str, component: str, keys: Any) -> str:
        """Store `keys` (an object) for credential `name`, encrypted, merged over the keys
        refreshed before; what to write in the step log. CredentialError: refused, why."""
        cred = self.definition(name)
        if cred is None:
            raise CredentialError(f"{self.unknown(name)}; the keys were dropped")
        if cred.component != component:
            raise CredentialError(
                f"credential {name} is for component {cred.component}, not {component}; the "
                "keys were dropped"
            )
        if not isinstance(keys, dict) or not keys:
            raise CredentialError(
                "emit('updateKeys', keys) needs a non-empty object of the credential's fields "
                "(e.g. { oauth: {...} }); nothing was stored"
            )
        bad = [k for k in keys if not isinstance(k, str) or not k or k.startswith("_")]
        if bad:
            raise CredentialError(
                f"emit('updateKeys') key {bad[0]!r} is not a field name (names starting with "
                "'_' are the platform's own); nothing was stored"
            )
        fernet = self._fernet()
        if fernet is None:
            raise CredentialError(
                f"the refreshed keys of credential {name} were not stored: daemon.secret_key "
                "is not set, and deployd never keeps keys in clear; set it (README: "
                "Credentials) so refreshed keys survive a restart"
            )
        if self.keys is None:
            raise CredentialError("no state database to store the keys in")
        before, _warning = self.stored(cred)
        merged = {**before, **keys}
        text = json.dumps(merged, separators=(",", ":"), default=str)
        if len(text) > MAX_KEYS_BYTES:
            raise CredentialError(
                f"the keys of credential {name} would be {len(text)} bytes as JSON, over "
                f"{MAX_KEYS_BYTES}; nothing was stored"
            )
        when = self.keys.put(name, component, fernet.encrypt(text.encode()), list(merged))
        return (
            f"emit('updateKeys'): the keys {', '.join(sorted(keys))} of credential {name} were "
            f"stored (encrypted) at {when}; every step using it gets them at its next start"
        )
