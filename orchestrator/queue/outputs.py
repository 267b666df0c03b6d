"""Where a job's artifacts go: a location that belongs to exactly one owner and one job.

- No `output.uri`: `jobs/<job id>/` in the service's object store (the id is the server's, so the folder
  is the job's alone).
- An `output.uri`: a folder under an allowed output root or bucket whose first segment below that root
  (or bucket) is the owner's own folder, `<root>/<owner>/...`, and which is not inside the service's
  object store (that is where every job's default folder and the calibration cache live). The job
  writes to `<output.uri>/<job id>/`, so two jobs, even of one owner with the same `output.uri`, never
  write the same objects.

`check_output_uri` runs at submission (a 422 saying what to change) and `output_target` again before
every attempt writes anything, so a job stored before these rules, or a changed configuration, cannot
write outside its own folder either.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlparse

from workers.errors import InputError
from workers.uris import InputPolicy, LocalInput, S3Input, parse_input_uri

MAX_SEGMENT = 100  # longer owner names get a hashed folder name (file systems allow 255 bytes)


def owner_segment(owner: str) -> str:
    """The owner's folder name: the name percent-encoded (so '/', '..' and odd characters cannot
    address another folder, and two owners never share one); '@' + a hash for very long names ('@' is
    always encoded by the first rule, so the two forms cannot collide)."""
    segment = quote(owner, safe="")
    if segment in ("", ".", ".."):
        segment = segment.replace(".", "%2E") or "%00"
    if len(segment) > MAX_SEGMENT:
        segment = "@" + hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return segment


def _store_location(object_store: str) -> Path | tuple[str, str]:
    """The service store as a resolved local directory, or (bucket, key prefix) for S3."""
    parsed = urlparse(object_store)
    if parsed.scheme == "s3":
        return parsed.netloc, parsed.path.strip("/")
    if parsed.scheme == "file":
        return Path(parsed.path).expanduser().resolve()
    return Path(object_store).expanduser().resolve()


def _key_within(key: str, prefix: str) -> bool:
    return not prefix or key == prefix or key.startswith(prefix + "/")


def _rule(segment: str, where: str) -> str:
    return (
        f"use a folder inside your own folder, {where}/{segment}/..., or omit output.uri to write to "
        "jobs/<job id>/ in the service's object store"
    )


def check_output_uri(uri: str, owner: str, policy: InputPolicy, object_store: str) -> LocalInput | S3Input:
    """The parsed `output.uri` if `owner`'s jobs may write below it; InputError saying what to change."""
    parsed = parse_input_uri(uri, policy, what="output")
    segment = owner_segment(owner)
    store = _store_location(object_store)
    if isinstance(parsed, S3Input):
        if isinstance(store, tuple) and store[0] == parsed.bucket and _key_within(parsed.key, store[1]):
            raise InputError(
                f"output URI {uri!r} is inside the service's object store, where other jobs' artifacts "
                f"live; {_rule(segment, f's3://{parsed.bucket}')}"
            )
        if parsed.key.split("/", 1)[0] != segment:
            raise InputError(
                f"output URI {uri!r} is not inside your owner's folder s3://{parsed.bucket}/{segment}/; "
                f"{_rule(segment, f's3://{parsed.bucket}')}"
            )
        return parsed
    path = parsed.path
    if isinstance(store, Path) and path.is_relative_to(store):
        raise InputError(
            f"output path {uri!r} is inside the service's object store, where other jobs' artifacts live; "
            f"{_rule(segment, '<allowed output root>')}"
        )
    for root in (r.resolve() for r in policy.allowed_roots):
        if not path.is_relative_to(root):
            continue  # parse_input_uri found at least one root that holds it
        below = path.relative_to(root).parts
        if not below or below[0] != segment:
            raise InputError(
                f"output path {uri!r} is not inside your owner's folder {root / segment}; "
                f"{_rule(segment, str(root))}"
            )
    return parsed


def output_target(
    spec_output_uri: str | None, *, owner: str, job_id: str, policy: InputPolicy, object_store: str
) -> tuple[str, str]:
    """(store URL, key prefix) the attempt writes to: the job's own folder, never anything shared."""
    if not spec_output_uri:
        return object_store, f"jobs/{job_id}"
    parsed = check_output_uri(spec_output_uri, owner, policy, object_store)
    if isinstance(parsed, LocalInput):
        return str(parsed.path / job_id), ""
    return f"s3://{parsed.bucket}/{PurePosixPath(parsed.key) / job_id}", ""
