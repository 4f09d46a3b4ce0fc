"""Credentials in the config, flow validation and the encrypted key store, without a daemon.

The end-to-end behaviour (cfg merged in real step processes, verify, updateKeys across a
restart) is tests/node/test_credentials.py; here: what check-config refuses and why, what
flow validation says of a step's credential, and that refreshed keys are stored encrypted
(the database's bytes do not hold them) and merged over the config's fields.
"""

from __future__ import annotations

import base64
import os
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from deployd import config as cfgmod
from deployd.errors import ConfigError
from deployd.flows import model
from deployd.runtime.credentials import CredentialError, Credentials
from deployd.store import Store
from tests.test_config import problems_of, run, write

KEY = base64.urlsafe_b64encode(os.urandom(32)).decode()


def config_text(creds: str, daemon: str = "") -> str:
    return textwrap.dedent(
        """\
        [daemon]
        state_dir = "state"
        {daemon}
        [[components]]
        name = "billing"
        [[components]]
        name = "other"
        """
    ).format(daemon=daemon) + textwrap.dedent(creds)


def test_credentials_load_with_secrets_expanded_and_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"s-{uuid.uuid4().hex}"
    monkeypatch.setenv("BILLING_API_KEY", secret)
    monkeypatch.setenv("DEPLOYD_SECRET_KEY", KEY)
    path = write(
        tmp_path / "config.toml",
        config_text(
            """\
            [[credentials]]
            name = "billing-prod"
            component = "billing"
            fields = { apiKey = "${BILLING_API_KEY}", region = "eu", auth = { user = "u" } }
            """,
            daemon='secret_key = "${DEPLOYD_SECRET_KEY}"',
        ),
    )
    cfg = cfgmod.load(path)
    cred = cfg.credential("billing-prod")
    assert cred is not None and cred.component == "billing"
    assert cred.fields == {"apiKey": secret, "region": "eu", "auth": {"user": "u"}}
    assert secret not in repr(cfg) and secret not in str(cfg)
    assert secret not in str(cfg.model_dump())
    assert cfg.daemon.secret_key is not None and KEY not in repr(cfg)
    # the credential's variable is deployd's own: a flow file's ${BILLING_API_KEY} is refused
    assert "BILLING_API_KEY" in cfg.own_env

    res = run(
        "check-config", "-c", str(path), env={"BILLING_API_KEY": secret, "DEPLOYD_SECRET_KEY": KEY}
    )
    assert res.returncode == 0, res.stderr
    assert "billing-prod" in res.stdout and "apiKey, auth, region" in res.stdout
    assert "secret_key set" in res.stdout
    assert secret not in res.stdout + res.stderr and KEY not in res.stdout


def test_check_config_lists_every_credential_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "h")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    problems = problems_of(
        config_text(
            """\
            [[credentials]]
            name = "dup"
            component = "billing"
            [[credentials]]
            name = "dup"
            component = "billing"
            [[credentials]]
            name = "Bad_Name"
            component = "billing"
            [[credentials]]
            name = "ghost"
            component = "nosuch"
            [[credentials]]
            name = "leaky"
            component = "billing"
            [credentials.fields]
            token = "${DEPLOYD_API_TOKEN}"
            again = "${HOOK_SECRET}"
            nope = "${NOT_SET_ANYWHERE}"
            [[credentials]]
            name = "private"
            component = "billing"
            fields = { _account = "x" }
            """,
            daemon='secret_key = "not-a-key"\napi_token = "${HOOK_SECRET}"',
        ),
        tmp_path,
    )
    text = "\n".join(problems)
    assert "credentials[1].name: 'dup' is already used by credentials[0]" in text
    assert "credentials[2].name: 'Bad_Name' is not a valid credential name" in text
    assert (
        "credentials[3].component: no [[components]] named 'nosuch' (known: billing, other)" in text
    )
    assert "credentials[4].fields.token: ${DEPLOYD_API_TOKEN} is one of deployd's own" in text
    assert "credentials[4].fields.again: ${HOOK_SECRET} is one of deployd's own" in text
    assert "credentials[4].fields.nope: environment variable NOT_SET_ANYWHERE is not set" in text
    assert "credentials[5].fields: '_account' is not a field name" in text
    assert "daemon.secret_key: is not a key deployd can encrypt with" in text
    with pytest.raises(ConfigError):
        cfgmod.parse({"credentials": {"name": "x"}}, tmp_path)


def step(**kw: Any) -> model.Step:
    base: dict[str, Any] = {
        "id": "write",
        "kind": "action",
        "component": "billing",
        "function": "write",
        "version": 1,
        "pinned": False,
    }
    return model.Step(**{**base, **kw})


DESC: dict[str, Any] = {
    "runtime": "python",
    "credentials": {"fields": {"apiKey": {"required": True}, "region": {"required": False}}},
    "actions": {"write": {"main": "./write.py"}},
}


def test_flow_validation_refuses_unusable_credentials_by_name() -> None:
    infos = {
        "good": model.CredentialInfo("billing", frozenset({"apiKey"})),
        "nokey": model.CredentialInfo("billing", frozenset({"region"})),
        "theirs": model.CredentialInfo("other", frozenset({"apiKey"})),
    }
    descs = {("billing", 1): DESC, ("billing", 2): {**DESC, "credentials": None}}

    def problems(s: model.Step) -> list[str]:
        return model.validate([s], descs, None, infos)

    assert problems(step(credential="good")) == []
    assert problems(step()) == []  # no credential named: nothing asked of one
    assert problems(step(credential="nope")) == [
        "step write: credential 'nope' is not defined in the daemon config (known: good, "
        "nokey, theirs); add a [[credentials]] table with name = 'nope', component = "
        '"billing" and its fields, then reload deployd'
    ]
    assert problems(step(credential="theirs")) == [
        "step write: credential 'theirs' belongs to component 'other', not 'billing'; name a "
        "credential of billing"
    ]
    assert problems(step(credential="nokey")) == [
        "step write: field 'apiKey' is required by billing v1 (component.json "
        "credentials.fields) but credential 'nokey' has no value for it; add it to the "
        "credential's fields in the daemon config"
    ]
    assert "billing v2 takes no credential" in problems(step(credential="good", version=2))[0]
    with pytest.raises(Exception, match="not a credential name"):
        model.StepSpec(id="a", component="billing", function="write", credential="No Way")


def test_refreshed_keys_are_encrypted_at_rest_and_merged_over_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEPLOYD_SECRET_KEY", KEY)
    path = write(
        tmp_path / "config.toml",
        config_text(
            """\
            [[credentials]]
            name = "billing-prod"
            component = "billing"
            fields = { apiKey = "k-config", region = "eu" }
            """,
            daemon='secret_key = "${DEPLOYD_SECRET_KEY}"',
        ),
    )
    cfg = cfgmod.load(path)
    store = Store.open(tmp_path / "state.db")
    try:
        creds = Credentials(cfg, store)
        refreshed = f"tok-{uuid.uuid4().hex}"
        text = creds.update_keys("billing-prod", "billing", {"oauth": {"access": refreshed}})
        assert "keys oauth of credential billing-prod were stored (encrypted)" in text
        assert refreshed not in text
        creds.update_keys("billing-prod", "billing", {"apiKey": "k-new"})
        merged, warning = creds.cfg("billing-prod", "billing", {"region": "us", "out": "/x"})
        assert warning is None
        assert merged == {
            "region": "eu",  # the credential's fields win over the step's config
            "out": "/x",
            "apiKey": "k-new",  # refreshed keys win over the config's fields
            "oauth": {"access": refreshed},  # and an earlier refresh stays
            "_account": "billing-prod",
        }
        listed = creds.describe()[0]
        assert listed["refreshed"]["fields"] == ["apiKey", "oauth"]
        assert refreshed not in repr(listed)
        with pytest.raises(CredentialError, match="is for component billing, not other"):
            creds.update_keys("billing-prod", "other", {"a": 1})
        with pytest.raises(CredentialError, match="needs a non-empty object"):
            creds.update_keys("billing-prod", "billing", ["a"])
        with pytest.raises(CredentialError, match="'_account' is not a field name"):
            creds.update_keys("billing-prod", "billing", {"_account": "x"})
    finally:
        store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    assert b"tok-" not in raw and b"k-new" not in raw and b"credential_keys" in raw

    # another key cannot read them: the config's fields are used, with a warning
    other = cfg.model_copy(
        update={
            "daemon": cfg.daemon.model_copy(
                update={"secret_key": SecretStr(base64.urlsafe_b64encode(os.urandom(32)).decode())}
            )
        }
    )
    store = Store.open(tmp_path / "state.db")
    try:
        merged, warning = Credentials(other, store).cfg("billing-prod", "billing", {})
        assert merged["apiKey"] == "k-config" and "oauth" not in merged
        assert warning is not None and "cannot be decrypted with daemon.secret_key" in warning
        # no key at all: refreshed keys are refused, never stored in clear
        bare = cfg.model_copy(update={"daemon": cfg.daemon.model_copy(update={"secret_key": None})})
        with pytest.raises(CredentialError, match=r"daemon\.secret_key is not set"):
            Credentials(bare, store).update_keys("billing-prod", "billing", {"apiKey": "k-3"})
    finally:
        store.close()
