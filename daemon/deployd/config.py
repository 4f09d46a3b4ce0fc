"""The configuration file: TOML validated once, at the edge, into frozen pydantic models.

`load(path)` returns a `Config` or raises `ConfigError` listing *every* problem as
``key.path: what is wrong``. Nothing else in deployd reads the TOML or the environment.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError, key_path

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def component_name(value: str) -> str:
    """`value` when it is a valid component name (a validator's check); else ValueError."""
    if not NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a valid component name")
    return value


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ENV_ONLY_RE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
# A branch name git would accept and that is safe to show; refs are never given to a shell anyway.
_BRANCH_RE = re.compile(
    r"^(?!/)(?!.*//)(?!.*\.\.)(?!.*@\{)[A-Za-z0-9._/-]{1,200}(?<!/)(?<!\.lock)$"
)


def parse_duration(value: Any) -> float:
    """Turn ``"500ms"``, ``"1s"``, ``"10m"``, ``"2h"``, ``"30d"`` or ``"0"`` into seconds."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "30s", "10m" or "1h"')
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError('a duration must be a finite number, such as "30s" or 30')
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError('expected a duration such as "30s", "10m" or "1h"')
    if value.strip() == "0":
        return 0.0
    match = _DURATION_RE.match(value)
    if not match:
        raise ValueError(
            f"{value!r} is not a duration; write a number and a unit: ms, s, m, h or d "
            '(e.g. "30s", "10m")'
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest exact way to write `seconds` back as a duration string."""
    if seconds == 0:
        return "0"
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{round(seconds * 1000)}ms"


Duration = Annotated[float, BeforeValidator(parse_duration)]


def positive(value: float) -> float:
    """For durations where 0 would make deployd useless (every build or publish would fail)."""
    if value <= 0:
        raise ValueError('must be longer than 0 (e.g. "30s")')
    return value


def is_local_url(url: str) -> bool:
    """True for a path or file:// url (a repository on this machine)."""
    if url.startswith("file://"):
        return True
    if "://" in url:
        return False
    # scp-like ssh syntax: user@host:path or host:path (but not C:\ or ./a:b)
    return not re.match(r"^[A-Za-z0-9._-]+(@[A-Za-z0-9._-]+)?:", url)


_REMOTE_SCHEMES = {"https", "http", "ssh", "git", "git+ssh", "ssh+git"}


def check_url(value: str) -> str:
    """Accept a path, file://, https://, http://, ssh://, git:// or scp-like url; no password."""
    if not value.strip():
        raise ValueError("is empty")
    if value.startswith("-"):
        raise ValueError("must not start with '-'")
    if any(ch.isspace() for ch in value):
        raise ValueError("must not contain spaces or control characters")
    if is_local_url(value):
        return value
    if "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme not in _REMOTE_SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme!r}: use https://, ssh://, git://, file://, "
                "user@host:path or a path"
            )
        try:
            password = urlsplit(value).password
        except ValueError as exc:
            raise ValueError(f"is not a valid url ({exc})") from None
        if password is not None:
            raise ValueError(
                "contains a password: never put credentials in the url (it would end up in "
                "logs); use an ssh key or a git credential helper of the user running deployd"
            )
    return value


_CREDENTIALS_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_url(text: str) -> str:
    """`text` (a url, or a message holding urls) without any ``user[:password]@`` part."""
    return _CREDENTIALS_RE.sub(r"\1", text)


def local_path(url: str) -> Path:
    """The filesystem path of a local url."""
    return Path(url[len("file://") :]) if url.startswith("file://") else Path(url)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_http_url(value: str, example: str) -> str:
    """`value` when it is an http(s) url with a host (and no credentials); else ValueError."""
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise ValueError(f"is not a valid url ({exc}); e.g. {example!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// url; e.g. {example!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold a user or password (it would end up in logs)")
    if any(ch.isspace() for ch in value):
        raise ValueError("must not contain spaces")
    return value


_REPO_PART_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,99}$")


def repo_path_of(url: str | None) -> str | None:
    """The repository's path on its hosting service from a remote `url` ("acme/billing" from
    https://github.com/acme/billing.git or git@github.com:acme/billing.git); None for a local
    or unusable url."""
    if url is None or is_local_url(url):
        return None
    if "://" in url:
        try:
            path = urlsplit(url).path
        except ValueError:
            return None
    else:  # scp-like ssh: [user@]host:path
        path = url.split(":", 1)[1]
    path = path.strip("/")
    if path.endswith(".git"):
        path = path[: -len(".git")]
    parts = path.split("/")
    if len(parts) < 2 or not all(_REPO_PART_RE.match(p) for p in parts):
        return None
    return path


def repo_host_of(url: str | None) -> str | None:
    """The host name of a remote `url` (https, ssh:// or scp-like); None for a local one."""
    if url is None or is_local_url(url):
        return None
    if "://" in url:
        try:
            return urlsplit(url).hostname
        except ValueError:
            return None
    return url.split(":", 1)[0].rsplit("@", 1)[-1] or None


# The public names of deployd's events, for [[notify]] events (and the json format's "event").
NOTIFY_EVENTS = (
    "build.started",
    "build.succeeded",
    "build.failed",
    "push.ignored",
    "deploy.started",
    "deploy.done",
    "deploy.failed",
    "deploy.rolled_back",
    "flow.needs_attention",
    "dead_letters.added",
)


class NotifyConfig(_Model):
    """One [[notify]] target: a webhook that gets the events named in `events`."""

    url: SecretStr
    format: Literal["slack", "json"] = "slack"
    events: tuple[str, ...] = ("build.failed", "deploy.failed", "deploy.rolled_back")
    secret: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        if not _ENV_ONLY_RE.match(value.get_secret_value()):  # unset: see Config.unset_env
            check_http_url(value.get_secret_value(), "https://hooks.slack.com/services/…")
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import difflib

        if not value:
            raise ValueError('is empty; name the events to send, e.g. ["deploy.failed"]')
        for name in value:
            if name not in NOTIFY_EVENTS:
                near = difflib.get_close_matches(name, NOTIFY_EVENTS, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ValueError(f"unknown event {name!r}; {hint}known: {', '.join(NOTIFY_EVENTS)}")
        return tuple(dict.fromkeys(value))

    @model_validator(mode="after")
    def _signed(self) -> NotifyConfig:
        if self.format == "json" and (
            self.secret is None or not self.secret.get_secret_value().strip()
        ):
            raise ValueError(
                'format = "json" needs secret (the key of the X-Deployd-Signature HMAC the '
                'receiver checks), e.g. secret = "${NOTIFY_SECRET}"'
            )
        return self


class DaemonConfig(_Model):
    state_dir: Path = Path("var")
    listen: str = "127.0.0.1:8787"
    api_token: SecretStr | None = None
    max_parallel_builds: int = Field(default=2, ge=1, le=64)
    warmup_timeout: Duration = 30.0
    rollback_window: Duration = 30.0
    rollback_exits: int = Field(default=3, ge=1, le=100)
    poll_interval: Duration = 180.0
    max_webhook_bytes: int = Field(default=5 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    stop_timeout: Duration = 20.0
    # How long a webhook's commit may take to appear on the branch at the configured url
    # before the branch head is built instead (hosting services replicate with a delay).
    webhook_wait: Duration = 60.0
    # How long the post-receive hook of a hosted repository follows a push and prints what the
    # daemon does with it (`remote:` lines of `git push`); "0" turns that off.
    push_feedback_wait: Duration = Field(default=60.0, ge=0, le=3600)
    # Node.js for runtime = "node": the binary (a name on PATH or a path), how many idle Node
    # sailors may be kept pre-started (0: none), and how long a process() that neither emits
    # 'end' nor returns a promise may take before its message is finished anyway.
    node: str = Field(default="node", min_length=1)
    node_pool: int = Field(default=32, ge=0, le=256)
    node_end_timeout: Duration = 60.0
    # The default Node build runs `npm test` (when package.json has a test script) between
    # installing with dev dependencies and pruning them, as the platform's buildpack does.
    node_test: bool = True
    log_format: Literal["text", "json"] = "text"
    # /healthz: unhealthy past this event-loop lag, or below this much free disk in state_dir.
    health_max_loop_lag: Duration = 2.0
    health_min_free_mb: int = Field(default=100, ge=0)
    health_min_free_percent: float = Field(default=1.0, ge=0, le=100)
    # Retention (`deployd gc`, and a periodic job every gc_interval; "0" turns the job off).
    keep_versions: int = Field(default=10, ge=1, le=100000)
    keep_logs: Duration = 30 * 86400.0
    gc_interval: Duration = 3600.0
    # The message path (issue 11): every step's input queue holds at most `max_queue`
    # messages before its producer is held back (a flow step's `max_queue` overrides it);
    # dead letters are kept `keep_dead_letters`, and at most `max_dead_letters` per step.
    max_queue: int = Field(default=10000, ge=1, le=10_000_000)
    keep_dead_letters: Duration = 14 * 86400.0
    max_dead_letters: int = Field(default=10000, ge=1, le=10_000_000)
    # Passthrough (issue 17): an output's record of what every earlier step of its flow
    # execution emitted is cut to this many bytes (the oldest steps' entries left out, with a
    # warning in the step log); 0 carries none.
    max_passthrough_bytes: int = Field(default=1024 * 1024, ge=0, le=8 * 1024 * 1024)
    # The object store (issue 17: attachments, the maester-client API): an object is at most
    # `max_object_bytes`; retention removes an object that messages referenced once no queued
    # message or dead letter does and `keep_attachments` passed since the last message that
    # referenced it was emitted, and an object no message ever referenced `keep_objects` after
    # it was written (or when its own x-eio-ttl passes).
    max_object_bytes: int = Field(default=100 * 1024 * 1024, ge=1, le=64 * 1024**3)
    keep_attachments: Duration = 86400.0
    keep_objects: Duration = 7 * 86400.0
    # Credentials (issue 17): the key that encrypts the keys steps refresh with
    # emit('updateKeys') in the state database (a Fernet key: 32 url-safe base64 bytes).
    # Unset: such keys are refused (never stored in clear).
    secret_key: SecretStr | None = None
    # The time zone of ordinary flows' cron `schedule` and of [[freeze]] schedules (an IANA
    # name such as "Europe/Berlin").
    timezone: str = "UTC"
    # Where people reach deployd's dashboard (e.g. "https://deployd.example.com"): commit
    # statuses and notifications link to its pages ({public_url}/ui/flows/NAME). Empty: no link.
    public_url: str = ""
    # The outbox (commit statuses, notifications): the first retry's delay (doubling, with
    # jitter, up to 10 minutes) and how long an undelivered one is tried before it is given up.
    outbox_retry: Duration = 2.0
    outbox_max_age: Duration = 86400.0
    # The dashboard (GET /ui): "loopback" — read-only without a login for a client on
    # 127.0.0.1/::1 while the daemon listens on loopback, the API token asked of everyone
    # else; "always" — the token asked of everyone (behind a reverse proxy on this machine,
    # every client would look local).
    ui_auth: Literal["loopback", "always"] = "loopback"

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        return check_http_url(value, "https://deployd.example.com") if value else value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        check_timezone(value)
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not is_fernet_key(value.get_secret_value()):
            raise ValueError(
                "is not a key deployd can encrypt with: give 32 random bytes, url-safe base64 "
                "encoded (44 characters), e.g. the output of python3 -c 'import base64, os; "
                "print(base64.urlsafe_b64encode(os.urandom(32)).decode())', set as an "
                'environment variable (secret_key = "${DEPLOYD_SECRET_KEY}")'
            )
        return value

    @field_validator("warmup_timeout", "rollback_window", "stop_timeout", "outbox_retry")
    @classmethod
    def _positive(cls, value: float) -> float:
        return positive(value)

    @field_validator("api_token")
    @classmethod
    def _api_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError(
                "is empty; remove the key (a token is then generated into state_dir) or set a "
                "long random string"
            )
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        _host, port = split_listen(value)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range (1-65535)")
        return value

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def listen_is_loopback(self) -> bool:
        host = self.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def is_fernet_key(text: str) -> bool:
    """Whether `text` is a Fernet key: 32 bytes in url-safe base64."""
    import base64
    import binascii

    try:
        return len(base64.urlsafe_b64decode(text.strip().encode("ascii"))) == 32
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False


def split_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:8787"`` / ``"[::1]:8787"`` → (host, port)."""
    match = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d{1,5})$", value) or re.match(
        r"^([A-Za-z0-9.-]+):(\d{1,5})$", value
    )
    if not match:
        raise ValueError(f'{value!r} is not HOST:PORT (e.g. "127.0.0.1:8787")')
    return match.group(1), int(match.group(2))


class ComponentConfig(_Model):
    name: str
    branch: str = "main"
    url: str | None = None
    build_timeout: Duration = 600.0
    webhook_secret: SecretStr | None = None
    webhook_secret_file: Path | None = None
    poll_interval: Duration | None = None
    watch: bool = True
    # Monorepos (issue 16): the folder of the repository holding component.json, where build
    # and test run and whose contents become the version; and the globs a push must change
    # something under to be built (None: every push builds).
    path: str | None = None
    paths: tuple[str, ...] | None = None
    # Commit statuses (issue 15): which hosting service's commit-status API to report each
    # pushed commit's build and deploys to, with which token; `report_api` for a self-hosted
    # instance; `report_repo` ("owner/name", GitLab "group/sub/project") when `url` does not
    # name the repository on that service (a hosted or local repository mirrored there).
    report: Literal["github", "gitlab", "gitea", "bitbucket", "none"] = "none"
    report_token: SecretStr | None = None
    report_api: str | None = None
    report_repo: str | None = None

    @field_validator("report_api")
    @classmethod
    def _report_api(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_http_url(value, "https://git.example.com/api/v3").rstrip("/")

    @field_validator("report_repo")
    @classmethod
    def _report_repo(cls, value: str | None) -> str | None:
        if value is None:
            return None
        clean = value.strip().strip("/")
        if clean.endswith(".git"):
            clean = clean[: -len(".git")]
        parts = clean.split("/")
        if len(parts) < 2 or not all(_REPO_PART_RE.match(p) for p in parts):
            raise ValueError(
                f"{value!r} is not a repository path on the hosting service; write it as "
                '"owner/name" (GitLab: "group/subgroup/project")'
            )
        return clean

    @model_validator(mode="after")
    def _report(self) -> ComponentConfig:
        if self.report == "none":
            return self
        if self.report_token is None or not self.report_token.get_secret_value().strip():
            raise ValueError(
                f'report = "{self.report}" needs report_token: a token allowed to set commit '
                'statuses, from the environment (report_token = "${BILLING_STATUS_TOKEN}")'
            )
        if self.report_repo is None and repo_path_of(self.url) is None:
            raise ValueError(
                f'report = "{self.report}" needs the repository on {self.report}: url '
                f"{'is not set' if self.url is None else 'does not name one'}; set report_repo "
                '= "owner/name" (or a url such as "https://github.com/acme/billing.git")'
            )
        if self.report == "bitbucket" and len(self.reported_repo.split("/")) != 2:
            raise ValueError(
                f"report_repo: Bitbucket repositories are workspace/name, not "
                f"{self.reported_repo!r}"
            )
        return self

    @property
    def reported_repo(self) -> str:
        """The repository's path on the hosting service commit statuses go to."""
        repo = self.report_repo or repo_path_of(self.url)
        assert repo is not None
        return repo

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        clean = repo_relative(value, "path", glob=False)
        return None if clean == "." else clean

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("is empty; leave it out to build on every push")
        if len(value) > 100:
            raise ValueError("has more than 100 globs")
        return tuple(repo_relative(v, "glob", glob=True) for v in value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a valid name: use 1-63 lowercase letters, digits and '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("build_timeout")
    @classmethod
    def _build_timeout(cls, value: float) -> float:
        return positive(value)

    @field_validator("branch")
    @classmethod
    def _branch(cls, value: str) -> str:
        if value.startswith("refs/"):
            raise ValueError(f"give the branch name, not the ref (e.g. {value.split('/')[-1]!r})")
        if not _BRANCH_RE.match(value):
            raise ValueError(f"{value!r} is not a valid branch name")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return check_url(value) if value is not None else None

    @model_validator(mode="after")
    def _one_secret(self) -> ComponentConfig:
        if self.webhook_secret is not None and self.webhook_secret_file is not None:
            raise ValueError("set webhook_secret or webhook_secret_file, not both")
        return self

    @property
    def hosted(self) -> bool:
        """True when deployd hosts the repository itself (no url)."""
        return self.url is None

    @property
    def local(self) -> bool:
        return self.url is None or is_local_url(self.url)

    @property
    def mirrored(self) -> bool:
        """True for a remote url: deployd fetches it into a mirror under state_dir."""
        return self.url is not None and not is_local_url(self.url)

    def poll_every(self, default: float) -> float:
        """Seconds between polls of the url (0: not polled).

        Remote urls and unwatched local ones are polled every `poll_interval` (default
        `default`); hosted repositories report pushes through their hook, watched local ones
        through the watcher, so they are polled only when `poll_interval` is set on them.
        """
        if self.url is None:
            return 0.0
        if self.poll_interval is not None:
            return self.poll_interval
        if self.local and self.watch:
            return 0.0
        return default

    @property
    def secret_configured(self) -> bool:
        return self.webhook_secret is not None or self.webhook_secret_file is not None

    def secret(self) -> str | None:
        """The webhook secret, read from the file when one is configured."""
        if self.webhook_secret is not None:
            return self.webhook_secret.get_secret_value()
        if self.webhook_secret_file is not None:
            return self.webhook_secret_file.read_text().strip()
        return None


def repo_relative(value: str, what: str, glob: bool) -> str:
    """A path (or, with `glob`, a glob) inside a repository, checked and written the one way:
    relative, with `/` between parts, no `..`, `.` or empty part (`a/./b`, `a//b`), no NUL,
    backslash or control character; a glob's `[...]` closed, and no leading `:` (git's
    pathspec magic) or `!`. ValueError naming what is wrong otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"a {what} is empty")
    shown = repr(value[:80])
    if len(value) > 500:
        raise ValueError(f"{what} {shown}... is longer than 500 characters")
    if not value.isprintable() or "\\" in value:
        raise ValueError(f"{what} {shown} holds a control character or a backslash; use '/'")
    if value.startswith("/"):
        raise ValueError(
            f"{what} {shown} is absolute; give it relative to the repository's root"
            ' (e.g. "components/billing")'
        )
    parts = value.rstrip("/").split("/")
    if value.rstrip("/") == ".":
        return "."
    if any(p == ".." for p in parts):
        raise ValueError(f"{what} {shown} leaves the repository ('..'); name a folder inside it")
    if any(p in ("", ".") for p in parts):
        raise ValueError(f"{what} {shown} has an empty or '.' part; write it as a/b")
    if glob:
        if value[0] in ":!":
            raise ValueError(f"glob {shown} starts with {value[0]!r}; start with a folder name")
        depth = 0
        for ch in value:
            depth += ch == "["
            depth -= ch == "]" and depth > 0
            if depth > 1:
                break
        if depth != 0 or value.count("[") != value.count("]"):
            raise ValueError(f"glob {shown} has an unclosed '['; write a class as [ab]")
        if any("**" in p and p != "**" for p in parts):
            raise ValueError(f"glob {shown}: '**' must be a whole part (a/**/b, a/**)")
    elif any(ch in value for ch in "*?["):
        raise ValueError(f"{what} {shown} is a glob; give the folder itself")
    return "/".join(parts)


_AMQP_URL_RE = re.compile(
    r"^amqps?://(?:[^@/\s]*@)?\[?[A-Za-z0-9._:-]+\]?(?::\d{1,5})?(?:/[^\s]*)?$"
)


class RabbitConfig(_Model):
    """[runtime.rabbitmq]: flows whose queues live in RabbitMQ (issue 12)."""

    # amqp://user:password@host:5672/vhost (or amqps://); a secret: never logged or shown.
    url: SecretStr | None = None
    # Where step processes run: "local" (this machine) or "kubernetes" ([runtime.kubernetes]).
    placement: Literal["local", "kubernetes"] = "local"
    # Unacked messages a step's consumer may hold (a step's own `prefetch` may lower it).
    prefetch: int = Field(default=16, ge=1, le=10000)

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        text = value.get_secret_value()
        if not _AMQP_URL_RE.match(text):
            raise ValueError(
                "is not an AMQP url; write amqp://USER:PASSWORD@HOST:5672/VHOST (amqps:// for TLS)"
            )
        port = re.search(r"@?[^@/]*:(\d{1,5})(?:/|$)", text.split("://", 1)[1])
        if port and not 0 < int(port.group(1)) < 65536:
            raise ValueError(f"port {port.group(1)} is out of range (1-65535)")
        return value


DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# An image reference: [registry[:port]/]path[:tag][@sha256:digest], no spaces.
_IMAGE_RE = re.compile(
    r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?(:[0-9]{1,5})?(/[a-z0-9]([a-z0-9._/-]*[a-z0-9])?)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?$"
)


class KubernetesConfig(_Model):
    """[runtime.kubernetes]: step processes of RabbitMQ flows as Deployments (issue 13),
    used when [runtime.rabbitmq] placement = "kubernetes"."""

    namespace: str = "deployd-flows"  # where step Deployments (and their Secrets) go
    # "": the in-cluster service account; else a kubeconfig file (relative to the config
    # file; "${KUBECONFIG}" takes the environment's).
    kubeconfig: str = ""
    image: str = ""  # the step image built from deploy/step/Containerfile
    public_url: str = ""  # how pods reach deployd's API (artifacts)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not DNS_LABEL_RE.match(value):
            raise ValueError(
                f"{value!r} is not a Kubernetes namespace name: 1-63 lowercase letters, "
                "digits and '-', starting and ending with a letter or digit"
            )
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if value and not _IMAGE_RE.match(value):
            raise ValueError(
                f"{value!r} is not an image reference; write REGISTRY/NAME:TAG "
                '(e.g. "registry.example.com/deployd-step:1")'
            )
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if not value:
            return value
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises for a bad port)
        except ValueError as exc:
            raise ValueError(f"is not a valid url ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{value!r} is not an http(s) url; write how pods reach deployd's API, "
                'e.g. "https://deployd.example.com"'
            )
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("must be scheme://host[:port][/path], with no user, query or #")
        return value.rstrip("/")


class RuntimeConfig(_Model):
    """[runtime]: what runs flows. `default` is the runtime of flows that name none."""

    default: Literal["embedded", "rabbitmq"] = "embedded"
    rabbitmq: RabbitConfig = RabbitConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()


MAX_CREDENTIAL_FIELDS = 256
MAX_CREDENTIAL_BYTES = 64 * 1024


class CredentialConfig(_Model):
    """[[credentials]]: an account of one component (the platform's credential), named by
    flow steps (`credential = "NAME"`). Its `fields` are secrets: their `${VAR}` are
    expanded at load, and they go to step processes only, never to a repr, a `model_dump`,
    a log or a status."""

    name: str
    component: str
    fields: dict[str, Any] = Field(default_factory=dict, repr=False, exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a valid credential name: use 1-63 lowercase letters, digits "
                "and '-', starting with a letter or digit (e.g. \"billing-prod\")"
            )
        return value

    @field_validator("component")
    @classmethod
    def _component(cls, value: str) -> str:
        return component_name(value)

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        import json

        if len(value) > MAX_CREDENTIAL_FIELDS:
            raise ValueError(f"has more than {MAX_CREDENTIAL_FIELDS} fields")
        for key in value:
            if not key or key.startswith("_") or not key.isprintable():
                raise ValueError(
                    f"{key!r} is not a field name (a field of the component's component.json "
                    "credentials.fields; names starting with '_' are the platform's own)"
                )
        try:
            size = len(json.dumps(value, default=str))
        except (ValueError, RecursionError):
            raise ValueError("cannot be written as JSON; flatten it") from None
        if size > MAX_CREDENTIAL_BYTES:
            raise ValueError(f"is larger than {MAX_CREDENTIAL_BYTES} bytes as JSON")
        return value


def check_timezone(value: str) -> Any:
    """The `ZoneInfo` of an IANA time zone name; ValueError naming the form otherwise."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        if not value or value != value.strip() or "\x00" in value:
            raise ValueError(value)
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f'{value[:80]!r} is not a time zone; give an IANA name such as "UTC" or '
            '"Europe/Berlin" (see /usr/share/zoneinfo)'
        ) from None


# A flow-name glob: the characters of flow names and the wildcards * ? [...] (with ! for not).
_FLOW_GLOB_RE = re.compile(r"^(?:[a-z0-9*?-]|\[!?[a-z0-9-]+\])+$")


def check_cron(value: str) -> str:
    """A five-field crontab line APScheduler's CronTrigger accepts; ValueError otherwise."""
    from apscheduler.triggers.cron import CronTrigger

    if len(value) > 200 or not value.isprintable():
        raise ValueError("is not a crontab line (at most 200 printable characters)")
    try:
        CronTrigger.from_crontab(value, timezone="UTC")
    except ValueError as exc:
        raise ValueError(
            f"{value!r} is not a cron schedule ({exc}); write five fields: minute hour "
            'day-of-month month day-of-week, e.g. "0 17 * * FRI"'
        ) from None
    return value


def _instant(value: Any) -> Any:
    """RFC 3339 with an offset (a TOML offset date-time or a string) → an aware datetime."""
    from datetime import datetime

    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f'{value[:80]!r} is not an RFC 3339 time; write e.g. "2026-12-20T00:00:00Z"'
            ) from None
    if not isinstance(value, datetime):
        raise ValueError('expected an RFC 3339 time such as "2026-12-20T00:00:00Z"')
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{value.isoformat()} has no time zone; add Z or an offset (e.g. "
            '"2026-12-20T00:00:00Z" or "2026-12-20T00:00:00+01:00")'
        )
    return value


class FreezeConfig(_Model):
    """[[freeze]]: a window in which automatic publishes of the matching flows wait (issue
    16): recurring (`schedule`, cron in daemon.timezone, and `duration`) or one-off (`from`,
    `to`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    flows: tuple[str, ...] = ("*",)
    schedule: str | None = None
    duration: Duration | None = None
    from_: Annotated[Any, BeforeValidator(_instant)] = Field(default=None, alias="from")
    to: Annotated[Any, BeforeValidator(_instant)] = None
    reason: str = Field(default="freeze window", min_length=1, max_length=200)

    @field_validator("flows")
    @classmethod
    def _flows(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError('is empty; leave it out for every flow, or list globs ("billing-*")')
        for pattern in value:
            if not isinstance(pattern, str) or not _FLOW_GLOB_RE.match(pattern):
                raise ValueError(
                    f"{str(pattern)[:80]!r} is not a flow-name glob: use lowercase letters, "
                    "digits, '-' and the wildcards *, ? and [...] (e.g. \"billing-*\")"
                )
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return check_cron(value) if value is not None else None

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        if not value.isprintable() or not value.strip():
            raise ValueError("must be one line of printable text")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> FreezeConfig:
        recurring = self.schedule is not None or self.duration is not None
        once = self.from_ is not None or self.to is not None
        if recurring and once:
            raise ValueError("give schedule and duration, or from and to, not both")
        if recurring and (self.schedule is None or self.duration is None):
            raise ValueError("a recurring window needs both schedule (cron) and duration")
        if once and (self.from_ is None or self.to is None):
            raise ValueError("a one-off window needs both from and to")
        if not recurring and not once:
            raise ValueError(
                'give schedule = "0 17 * * FRI" with duration = "64h", or from and to '
                "(RFC 3339 times)"
            )
        if self.duration is not None and self.duration <= 0:
            raise ValueError('duration must be longer than 0 (e.g. "64h")')
        if self.duration is not None and self.duration > 366 * 86400:
            raise ValueError("duration is longer than a year; use a one-off window (from, to)")
        if once and self.from_ >= self.to:
            raise ValueError(
                f"to ({self.to.isoformat()}) is not after from ({self.from_.isoformat()})"
            )
        return self


class Config(_Model):
    daemon: DaemonConfig = DaemonConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    components: tuple[ComponentConfig, ...] = ()
    credentials: tuple[CredentialConfig, ...] = ()
    freeze: tuple[FreezeConfig, ...] = ()
    notify: tuple[NotifyConfig, ...] = ()
    path: Path | None = None
    # Every ${NAME} the config file mentions: deployd's own secrets, which flows cannot read.
    own_env: frozenset[str] = frozenset()
    # The ${NAME}s not set in this process's environment, when loaded with secrets=False (a
    # read-only CLI command): the keys using them are left out.
    unset_env: frozenset[str] = frozenset()

    def component(self, name: str) -> ComponentConfig | None:
        for comp in self.components:
            if comp.name == name:
                return comp
        return None

    def credential(self, name: str) -> CredentialConfig | None:
        for cred in self.credentials:
            if cred.name == name:
                return cred
        return None

    @property
    def state_dir(self) -> Path:
        return self.daemon.state_dir


def resolve_path(explicit: Path | None) -> Path:
    """`-c` if given, else ``$DEPLOYD_CONFIG``, else ``./config.toml``, else the system file."""
    if explicit is not None:
        return explicit
    env = os.environ.get("DEPLOYD_CONFIG")
    if env:
        return Path(env)
    local = Path("config.toml")
    if local.exists():
        return local
    return Path("/etc/deployd/config.toml")


def _expand_env(
    value: Any, where: str, problems: list[str], unset: set[str] | None = None, keep: bool = False
) -> Any:
    """`value` with its `${NAME}` expanded. An unset NAME is a problem, unless `unset` is
    given (a read-only command, which never needs the secret): then NAME is added to it and
    None is returned, so the key is left out as if it were not configured — or, with `keep`,
    the value stays as written (`${NAME}`: a key other keys require, such as `report_token`;
    nothing sends with it in a read-only command)."""
    if isinstance(value, str):
        missing = [name for name in _ENV_RE.findall(value) if name not in os.environ]
        if missing and unset is not None:
            unset.update(missing)
            return value if keep else None
        for name in missing:
            problems.append(f"{where}: environment variable {name} is not set")

        def sub(match: re.Match[str]) -> str:
            return os.environ.get(match.group(1), "")

        return _ENV_RE.sub(sub, value)
    return value


def _set_or_drop(table: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """`table` with `key` set to `value`, or without `key` when `value` is None."""
    out = {k: v for k, v in table.items() if k != key}
    if value is not None:
        out[key] = value
    return out


def nearest_key(root: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The known key of the table at `loc[:-1]` of a `root` document closest to the unknown
    key `loc[-1]` (difflib), for "unknown key; did you mean …?"; None when none is close."""
    import difflib

    if not loc:
        return None
    close = difflib.get_close_matches(str(loc[-1]), _known_keys(root, loc), n=1)
    return close[0] if close else None


def _known_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the table at `loc[:-1]` of a `root` document takes (empty: not a known table)."""
    import typing

    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        kinds = [field.annotation]
        model = None
        while kinds:
            kind = kinds.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                model = kind
                break
            kinds += [a for a in typing.get_args(kind) if a is not Ellipsis]
        if model is None:
            return []
    fields = getattr(model, "model_fields", {})
    return [
        f.alias or name
        for name, f in fields.items()
        if name not in ("path", "own_env", "unset_env")
    ]


def _message(err: Any) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", ""))
    if kind == "extra_forbidden":
        close = nearest_key(Config, tuple(err.get("loc") or ()))
        if close:
            return f"unknown key; did you mean {close!r}? (config.example.toml lists every key)"
        return "unknown key (check the spelling; config.example.toml lists every key)"
    if kind == "model_type":  # not "... or instance of DaemonConfig"
        return "must be a table of keys (e.g. [daemon] or [[components]])"
    if kind == "path_type":
        return 'must be a path written as a string (e.g. "var")'
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return msg


def load(path: Path, secrets: bool = True) -> Config:
    """Read and validate the config file at `path`; raise `ConfigError` listing every problem.

    `secrets=False`: for a command that never uses deployd's secrets (the CLI, whose commands
    read the state or ask the daemon, which has them): a `${NAME}` not set here is no problem,
    the key using it is left out (`Config.unset_env` names them)."""
    try:
        raw_bytes = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"config file {path} does not exist; pass -c FILE or set DEPLOYD_CONFIG "
            "(config.example.toml is a documented starting point)"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(raw_bytes.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path} is nested too deeply to read; flatten its tables") from exc
    return parse(raw, base=path.resolve().parent, path=path.resolve(), secrets=secrets)


def parse(
    raw: dict[str, Any], base: Path, path: Path | None = None, secrets: bool = True
) -> Config:
    """Validate an already-parsed TOML document; relative paths are taken from `base`."""
    problems: list[str] = []
    unset: set[str] | None = None if secrets else set()
    rabbit_unset = False
    raw = dict(raw)
    own_env = frozenset(_env_names(raw))
    # deployd's own secrets, which a credential (given to steps) may not name
    own_outside = _env_names({k: v for k, v in raw.items() if k != "credentials"})
    comps = raw.get("components")
    if comps is not None and not isinstance(comps, list):
        problems.append("components: must be an array of tables ([[components]])")
        raw.pop("components")
    elif comps:
        expanded = []
        for i, comp in enumerate(comps):
            if isinstance(comp, dict) and "webhook_secret" in comp:
                value = _expand_env(
                    comp["webhook_secret"], f"components[{i}].webhook_secret", problems, unset
                )
                comp = _set_or_drop(comp, "webhook_secret", value)
            if isinstance(comp, dict) and "report_token" in comp:
                where = f"components[{i}].report_token"
                value = _expand_env(comp["report_token"], where, problems, unset, keep=True)
                comp = {**comp, "report_token": value}
            expanded.append(comp)
        raw["components"] = expanded
    daemon_raw = raw.get("daemon")
    if isinstance(daemon_raw, dict) and "secret_key" in daemon_raw:
        value = _expand_env(daemon_raw["secret_key"], "daemon.secret_key", problems, unset)
        raw["daemon"] = _set_or_drop(daemon_raw, "secret_key", value)
    notify = raw.get("notify")
    if notify is not None and not isinstance(notify, list):
        problems.append("notify: must be an array of tables ([[notify]] with url and events)")
        raw.pop("notify")
    elif notify:
        raw["notify"] = [
            {
                k: _expand_env(v, f"notify[{i}].{k}", problems, unset, keep=True)
                if k in ("url", "secret")
                else v
                for k, v in target.items()
            }
            if isinstance(target, dict)
            else target
            for i, target in enumerate(notify)
        ]
    creds = raw.get("credentials")
    if creds is not None and not isinstance(creds, list):
        problems.append(
            "credentials: must be an array of tables ([[credentials]] with name, component "
            "and fields)"
        )
        raw.pop("credentials")
    elif creds:
        raw["credentials"] = _expand_credentials(own_outside, creds, problems, unset)
    runtime = raw.get("runtime")
    if isinstance(runtime, dict) and isinstance(runtime.get("rabbitmq"), dict):
        rabbit = dict(runtime["rabbitmq"])
        if "url" in rabbit:
            value = _expand_env(rabbit["url"], "runtime.rabbitmq.url", problems, unset)
            rabbit = _set_or_drop(rabbit, "url", value)
            rabbit_unset = value is None  # not set here (the daemon has it): nothing to check
        raw["runtime"] = runtime = {**runtime, "rabbitmq": rabbit}
    if isinstance(runtime, dict) and isinstance(runtime.get("kubernetes"), dict):
        kube = dict(runtime["kubernetes"])
        if isinstance(kube.get("kubeconfig"), str) and kube["kubeconfig"]:
            where = "runtime.kubernetes.kubeconfig"
            text = _expand_env(kube["kubeconfig"], where, problems, unset)
            kube["kubeconfig"] = str(base / text) if text else ""
        raw["runtime"] = {**runtime, "kubernetes": kube}
    cfg: Config | None = None
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(f"{key_path(err['loc'])}: {_message(err)}")
    # The checks below read the raw values, so they run (and are listed) even when the models
    # failed: one check-config run shows every problem.
    state_dir, comp_updates = _check_places(raw, base, problems)
    if (
        cfg is not None
        and cfg.runtime.default == "rabbitmq"
        and cfg.runtime.rabbitmq.url is None
        and not rabbit_unset
    ):
        problems.append(
            'runtime.default: is "rabbitmq" but [runtime.rabbitmq] url is not set '
            '(e.g. url = "${DEPLOYD_AMQP_URL}")'
        )
    if cfg is not None and not rabbit_unset:
        problems += _kubernetes_problems(cfg.runtime)
    _check_webhook_secrets(raw, problems)
    _check_credentials(raw, problems)
    if cfg is None or problems:
        raise ConfigError(f"{path or 'config'} has {len(problems)} problem(s):", problems)
    comps_out = [
        comp.model_copy(update=update) if update else comp
        for comp, update in zip(cfg.components, comp_updates, strict=True)
    ]
    daemon = cfg.daemon.model_copy(update={"state_dir": state_dir or cfg.daemon.state_dir})
    return cfg.model_copy(
        update={
            "daemon": daemon,
            "components": tuple(comps_out),
            "path": path,
            "own_env": own_env,
            "unset_env": frozenset(unset or ()),
        }
    )


def _kubernetes_problems(runtime: RuntimeConfig) -> list[str]:
    """What placement = "kubernetes" needs that [runtime.kubernetes] does not say."""
    if runtime.rabbitmq.placement != "kubernetes":
        return []
    kube, out = runtime.kubernetes, []
    if not kube.image:
        out.append(
            'runtime.kubernetes.image: placement is "kubernetes" but no step image is set; '
            "build deploy/step/Containerfile, push it and name it here "
            '(e.g. image = "registry.example.com/deployd-step:1")'
        )
    if not kube.public_url:
        out.append(
            'runtime.kubernetes.public_url: placement is "kubernetes" but pods are not told '
            'how to reach deployd\'s API (e.g. public_url = "https://deployd.example.com")'
        )
    if runtime.rabbitmq.url is None:
        out.append(
            'runtime.rabbitmq.url: placement is "kubernetes" but no broker url is set '
            '(e.g. url = "${DEPLOYD_AMQP_URL}")'
        )
    return out


def _expand_credentials(
    own: set[str], creds: list[Any], problems: list[str], unset: set[str] | None = None
) -> list[Any]:
    """[[credentials]] with the `${VAR}` in their fields' strings (at any depth) expanded.

    A credential goes to step processes, so it cannot read deployd's own secrets: `DEPLOYD_*`
    names and `own` (the names the rest of the config file uses) are refused, as in flow
    files."""

    def expand(value: Any, where: str) -> Any:
        if isinstance(value, dict):
            return {k: expand(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):
            for name in _ENV_RE.findall(value):
                if name.startswith("DEPLOYD_") or name in own:
                    problems.append(
                        f"{where}: ${{{name}}} is one of deployd's own settings (the config "
                        "file uses it elsewhere, or it starts with DEPLOYD_), which steps "
                        "never get; export the credential's secret under another name"
                    )
                    return ""
            expanded = _expand_env(value, where, problems, unset)
            return "" if expanded is None else expanded
        return value

    out = []
    for i, cred in enumerate(creds):
        if isinstance(cred, dict) and isinstance(cred.get("fields"), dict):
            try:
                cred = {**cred, "fields": expand(cred["fields"], f"credentials[{i}].fields")}
            except RecursionError:
                problems.append(f"credentials[{i}].fields: nested too deeply; flatten it")
                cred = {**cred, "fields": {}}
        out.append(cred)
    return out


def _check_credentials(raw: dict[str, Any], problems: list[str]) -> None:
    """Credential names are unique, and each names a configured component."""
    creds = raw.get("credentials")
    comps = raw.get("components")
    names = {
        c["name"]
        for c in (comps if isinstance(comps, list) else [])
        if isinstance(c, dict) and isinstance(c.get("name"), str)
    }
    seen: dict[str, int] = {}
    for i, cred in enumerate(creds if isinstance(creds, list) else []):
        if not isinstance(cred, dict):
            continue
        name = cred.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append(
                    f"credentials[{i}].name: {name!r} is already used by credentials[{seen[name]}]"
                )
            seen.setdefault(name, i)
        comp = cred.get("component")
        if isinstance(comp, str) and NAME_RE.match(comp) and comp not in names:
            known = ", ".join(sorted(names)) or "none"
            problems.append(
                f"credentials[{i}].component: no [[components]] named {comp!r} (known: {known})"
            )


def _env_names(value: Any) -> set[str]:
    """Every ${NAME} in a raw config document (its strings, at any depth)."""
    if isinstance(value, str):
        return set(_ENV_RE.findall(value))
    if isinstance(value, dict):
        return {n for v in value.values() for n in _env_names(v)}
    if isinstance(value, list):
        return {n for v in value for n in _env_names(v)}
    return set()


def env_value(name: str) -> str | None:
    """The daemon's environment variable `name` (None: not set), for a flow file's `${NAME}`:
    config is the one module that reads the environment."""
    return os.environ.get(name)


def _resolve(base: Path, value: str) -> Path:
    path = Path(value)
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _check_places(
    raw: dict[str, Any], base: Path, problems: list[str]
) -> tuple[Path | None, list[dict[str, Any]]]:
    """Resolve paths against `base` and check what they point at, and that names are unique.

    Returns the resolved state_dir and, per component, the fields to replace.
    """
    daemon = raw.get("daemon")
    state_raw = daemon.get("state_dir", "var") if isinstance(daemon, dict) else "var"
    state_dir = _resolve(base, state_raw) if isinstance(state_raw, str) else None
    if isinstance(state_raw, str) and (not state_raw.strip() or "\x00" in state_raw):
        problems.append(
            'daemon.state_dir: is empty or holds a NUL character; give a folder (e.g. "var")'
        )
        state_dir = None
    if state_dir is not None:
        if state_dir.exists() and not state_dir.is_dir():
            problems.append(f"daemon.state_dir: {state_dir} exists and is not a directory")
        elif state_dir.exists() and not os.access(state_dir, os.W_OK | os.X_OK):
            problems.append(f"daemon.state_dir: {state_dir} is not writable by this user")

    comps = raw.get("components")
    updates: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, comp in enumerate(comps if isinstance(comps, list) else []):
        update: dict[str, Any] = {}
        updates.append(update)
        if not isinstance(comp, dict):
            continue
        where = f"components[{i}]"
        name = comp.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append(
                    f"{where}.name: {name!r} is already used by components[{seen[name]}]"
                )
            seen.setdefault(name, i)
        url = comp.get("url")
        if isinstance(url, str) and is_local_url(url):
            repo = _resolve(base, str(local_path(url)))
            if not (repo / "HEAD").is_file() or not (repo / "objects").is_dir():
                problems.append(
                    f"{where}.url: {repo} is not a readable bare git repository "
                    "(create it with `git init --bare`)"
                )
            update["url"] = ("file://" if url.startswith("file://") else "") + str(repo)
        secret_file = comp.get("webhook_secret_file")
        if isinstance(secret_file, str) and (not secret_file.strip() or "\x00" in secret_file):
            problems.append(
                f"{where}.webhook_secret_file: is empty or holds a NUL character; give the "
                "path of a file holding the secret"
            )
        elif isinstance(secret_file, str):
            secret_path = _resolve(base, secret_file)
            try:
                if not secret_path.read_text().strip():
                    problems.append(f"{where}.webhook_secret_file: {secret_path} is empty")
            except OSError as exc:
                problems.append(
                    f"{where}.webhook_secret_file: {secret_path} cannot be read ({exc.strerror})"
                )
            update["webhook_secret_file"] = secret_path
        secret_key = f"{where}.webhook_secret:"
        if comp.get("webhook_secret") == "" and not any(p.startswith(secret_key) for p in problems):
            problems.append(f"{secret_key} is empty")
    return state_dir, updates


def _check_webhook_secrets(raw: dict[str, Any], problems: list[str]) -> None:
    """Unsigned webhooks are accepted only on loopback: elsewhere every component needs a secret."""
    daemon = raw.get("daemon")
    listen = daemon.get("listen", "127.0.0.1:8787") if isinstance(daemon, dict) else None
    if not isinstance(listen, str):
        listen = "127.0.0.1:8787"
    try:
        loopback = DaemonConfig(listen=listen).listen_is_loopback
    except ValidationError:
        return  # the bad listen value is reported on its own
    if loopback:
        return
    comps = raw.get("components")
    for i, comp in enumerate(comps if isinstance(comps, list) else []):
        if not isinstance(comp, dict):
            continue
        if comp.get("webhook_secret") is None and comp.get("webhook_secret_file") is None:
            problems.append(
                f"components[{i}].webhook_secret: required because daemon.listen {listen} is "
                "not a loopback address (unsigned webhooks are accepted only on loopback); set "
                "webhook_secret or webhook_secret_file"
            )
