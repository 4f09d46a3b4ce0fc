"""The commit-status request of each hosting service, built from the config at send time.

Sources (each provider's own reference, looked up for this module):
- GitHub: "Create a commit status", https://docs.github.com/rest/commits/statuses —
  ``POST /repos/{owner}/{repo}/statuses/{sha}``, JSON ``state`` (error | failure | pending |
  success), ``target_url``, ``description``, ``context``; ``Authorization: Bearer TOKEN``,
  ``Accept: application/vnd.github+json``, ``X-GitHub-Api-Version: 2022-11-28``; a
  description over 140 characters is refused with 422 ("description is too long (maximum is
  140 characters)"). GitHub Enterprise Server: the same under ``https://HOST/api/v3``.
- GitLab: "Commits API, set the pipeline status of a commit",
  https://docs.gitlab.com/ee/api/commits.html — ``POST /projects/:id/statuses/:sha`` where
  ``:id`` is the project id or its URL-encoded path (``group%2Fproject``); ``state`` (pending |
  running | success | failed | canceled | skipped), ``name`` (the context), ``target_url``,
  ``description``; ``PRIVATE-TOKEN: TOKEN``; base ``https://HOST/api/v4``.
- Gitea / Forgejo: the swagger of ``/api/v1``, ``CreateStatusOption`` —
  ``POST /repos/{owner}/{repo}/statuses/{sha}`` with ``state`` (pending | success | error |
  failure | warning), ``target_url``, ``description``, ``context``; ``Authorization: token
  TOKEN`` (https://docs.gitea.com/development/api-usage).
- Bitbucket Cloud: "Create a build status for a commit",
  https://developer.atlassian.com/cloud/bitbucket/rest/api-group-commit-statuses/ —
  ``POST /2.0/repositories/{workspace}/{repo_slug}/commit/{commit}/statuses/build`` with
  ``key`` (the context; a status of the same key is overwritten), ``state`` (INPROGRESS |
  SUCCESSFUL | FAILED | STOPPED), ``url``, ``name``, ``description``; ``Authorization: Bearer
  TOKEN`` (a repository or workspace access token). A ``key`` over 40 characters is refused
  with 400 ("key: Ensure this value has at most 40 characters"), as several CI integrations
  report (buildbot#7049, fluxcd/notification-controller#173): a longer context is cut and
  given a hash suffix, the same for every status of it, and sent whole as ``name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ..config import ComponentConfig, repo_host_of

DESCRIPTION_MAX = 140  # GitHub's limit; the others take as much, and shorter reads better
# deployd's own states (the `state` of a status row) → each provider's names.
STATES: dict[str, dict[str, str]] = {
    "github": {"pending": "pending", "success": "success", "failure": "failure"},
    "gitea": {"pending": "pending", "success": "success", "failure": "failure"},
    "gitlab": {"pending": "running", "success": "success", "failure": "failed"},
    "bitbucket": {"pending": "INPROGRESS", "success": "SUCCESSFUL", "failure": "FAILED"},
}


@dataclass(frozen=True)
class Request:
    """One HTTP request to send; `secrets` are the strings never to show (the token)."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    secrets: tuple[str, ...] = ()


def api_base(comp: ComponentConfig) -> str:
    """`report_api`, or the public API of the provider (for GitLab and Gitea, on the host of
    the component's url; GitHub Enterprise when the url is not on github.com)."""
    if comp.report_api:
        return comp.report_api.rstrip("/")
    host = repo_host_of(comp.url)
    if comp.report == "github":
        if host is None or host == "github.com":
            return "https://api.github.com"
        return f"https://{host}/api/v3"
    if comp.report == "gitlab":
        return f"https://{host or 'gitlab.com'}/api/v4"
    if comp.report == "gitea":
        return f"https://{host or 'gitea.com'}/api/v1"
    return "https://api.bitbucket.org"


def shorten(text: str, limit: int = DESCRIPTION_MAX) -> str:
    """`text` on one line, cut at a word to at most `limit` characters (with …)."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    cut = line[: limit - 1]
    if " " in cut[limit // 2 :]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:") + "…"


BITBUCKET_KEY_MAX = 40


def bitbucket_key(context: str) -> str:
    """`context` as a Bitbucket status key: itself up to 40 characters, else cut with a stable
    8-character hash of the whole (so one flow's statuses keep overwriting one key)."""
    import hashlib

    if len(context) <= BITBUCKET_KEY_MAX:
        return context
    digest = hashlib.sha256(context.encode()).hexdigest()[:8]
    return f"{context[: BITBUCKET_KEY_MAX - 9]}-{digest}"


def status_request(comp: ComponentConfig, payload: dict[str, Any]) -> Request:
    """The request that sets `payload` (sha, context, state, description, target_url) as a
    commit status on `comp`'s hosting service."""
    import json

    assert comp.report_token is not None
    token = comp.report_token.get_secret_value()
    provider = comp.report
    sha = payload["sha"]
    state = STATES[provider][payload["state"]]
    description = shorten(payload.get("description") or "")
    target = payload.get("target_url")
    repo = comp.reported_repo
    base = api_base(comp)
    headers = {"Content-Type": "application/json", "User-Agent": "deployd"}
    body: dict[str, Any]
    if provider == "github":
        owner, name = repo.split("/", 1)
        url = f"{base}/repos/{quote(owner)}/{quote(name)}/statuses/{sha}"
        headers |= {
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
        }
        body = {"state": state, "context": payload["context"], "description": description}
        if target:
            body["target_url"] = target
    elif provider == "gitea":
        owner, name = repo.split("/", 1)
        url = f"{base}/repos/{quote(owner)}/{quote(name)}/statuses/{sha}"
        headers |= {"Authorization": f"token {token}", "Accept": "application/json"}
        body = {"state": state, "context": payload["context"], "description": description}
        if target:
            body["target_url"] = target
    elif provider == "gitlab":
        url = f"{base}/projects/{quote(repo, safe='')}/statuses/{sha}"
        headers |= {"PRIVATE-TOKEN": token, "Accept": "application/json"}
        body = {"state": state, "name": payload["context"], "description": description}
        if target:
            body["target_url"] = target
    else:  # bitbucket
        workspace, name = repo.split("/", 1)
        url = (
            f"{base}/2.0/repositories/{quote(workspace)}/{quote(name)}/commit/{sha}/statuses/build"
        )
        headers |= {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        body = {
            "key": bitbucket_key(payload["context"]),
            "state": state,
            "name": payload["context"],
            "description": description,
            # Bitbucket wants a url; without a dashboard the commit's own page.
            "url": target or f"https://bitbucket.org/{repo}/commits/{sha}",
        }
    return Request("POST", url, headers, json.dumps(body).encode(), (token,))
