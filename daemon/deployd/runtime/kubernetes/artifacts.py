"""A component version's artifact as pods download it: one reproducible `.tar.gz`, its sha256,
and the token that lets one flow version's pods fetch it.

The archive is built from the version's artifact folder with fixed metadata (sorted names,
mtime 0, owner 0, gzip without a timestamp), so the same folder always gives the same bytes
and the sha256 written into a Deployment is the one the pod checks. It is kept at
`state_dir/artifacts/<component>-<version>.tar.gz` (written to a temporary file, then renamed)
next to its `.sha256`, built once per version.

The token is an HS256 JWT signed with the object storage's key (`objects.sign_token`):
`{"iss": "deployd", "scope": "artifacts", "flowId", "flowVersion"}`. It opens only the
artifacts of the component versions that flow version runs (`api/artifacts.py` checks that).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

from ...objects import sign_token, verified_claims

SCOPE = "artifacts"
CHUNK = 1 << 16


def artifact_token(key: bytes, flow: str, version: int) -> str:
    """The token of `flow` version `version`'s pods for `GET /api/v1/artifacts/…`."""
    return sign_token(
        key, {"flowId": flow, "flowVersion": version, "iss": "deployd", "scope": SCOPE}
    )


def token_flow_version(key: bytes, authorization: str | None) -> tuple[str, int] | None:
    """(flow, version) of an artifact token signed with `key`; None for anything else."""
    claims = verified_claims(key, authorization)
    if claims is None or claims.get("scope") != SCOPE:
        return None
    flow, version = claims.get("flowId"), claims.get("flowVersion")
    if not isinstance(flow, str) or not flow or type(version) is not int or version < 1:
        return None
    return flow, version


def _filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if info.issym() or info.islnk():
        return info  # kept as links; the pod refuses links that leave the folder
    if not (info.isfile() or info.isdir()):
        return None  # sockets, fifos, devices: not code
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() or info.mode & 0o100 else 0o644
    return info


def write_archive(folder: Path, out: BinaryIO) -> None:
    """The reproducible .tar.gz of `folder` (its contents at the archive's top) into `out`."""
    with (
        gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            base = Path(root)
            for name in sorted(dirs + files):
                path = base / name
                arc = str(path.relative_to(folder))
                info = _filter(tar.gettarinfo(str(path), arcname=arc))
                if info is None:
                    continue
                if info.isfile():
                    with path.open("rb") as fh:
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)


def digest(folder: Path) -> str:
    """The sha256 of `folder`'s archive, computed without writing it anywhere."""
    sink = _HashingWriter(None)
    write_archive(folder, sink)  # type: ignore[arg-type]
    return sink.h.hexdigest()


def ensure_archive(cache: Path, component: str, version: int, folder: Path) -> tuple[Path, str]:
    """The archive of `component` v`version` (built from `folder` if not yet) and its sha256."""
    path = cache / f"{component}-{version}.tar.gz"
    sha_path = path.with_suffix(".sha256")
    with contextlib.suppress(FileNotFoundError):
        sha = sha_path.read_text().strip()
        if len(sha) == 64 and path.exists():
            return path, sha
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".tmp-", suffix=".tar.gz")
    try:
        with os.fdopen(fd, "wb") as fh:
            h = _HashingWriter(fh)
            write_archive(folder, h)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        sha = h.h.hexdigest()
        os.replace(tmp, path)
        # A temporary file of its own (not a fixed name): two pods asking at once both build
        # the same reproducible archive, and each renames only what it wrote.
        sha_fd, sha_tmp = tempfile.mkstemp(dir=cache, prefix=".tmp-", suffix=".sha256")
        with os.fdopen(sha_fd, "w") as sh:
            sh.write(sha + "\n")
        os.replace(sha_tmp, sha_path)  # after the archive: a sha file names a whole one
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path, sha


class _HashingWriter(io.RawIOBase):
    """Writes through to a file (None: nowhere) and hashes what it wrote."""

    def __init__(self, fh: BinaryIO | None) -> None:
        self.fh = fh
        self.h = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.h.update(data)
        if self.fh is not None:
            self.fh.write(data)
        return len(data)
