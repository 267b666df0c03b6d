"""Object stores (a local directory and S3 over real HTTP via moto) and the input-URI allow-list."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import boto3
import pytest

from workers.errors import InputError
from workers.storage import LocalStore, S3Store, check_key, open_store
from workers.uris import InputPolicy, LocalInput, S3Input, check_input_exists, materialize, parse_input_uri


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> LocalStore | S3Store:
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Store(request.getfixturevalue("s3_bucket"), "team/run", endpoint_url=endpoint)


def test_round_trip_list_and_overwrite(store: LocalStore | S3Store, tmp_path: Path) -> None:
    src = tmp_path / "weights.bin"
    src.write_bytes(b"\x00\x01" * 1000)
    store.put_file("jobs/1/model.safetensors", src)
    store.put_bytes("jobs/1/eval.json", b'{"ppl": 1}')
    store.put_bytes("jobs/10/eval.json", b"other job")
    assert store.get_bytes("jobs/1/model.safetensors") == src.read_bytes()
    assert store.exists("jobs/1/eval.json") and not store.exists("jobs/1/missing.json")
    assert store.list("jobs/1") == ["jobs/1/eval.json", "jobs/1/model.safetensors"]  # not jobs/10
    assert store.list("") == ["jobs/1/eval.json", "jobs/1/model.safetensors", "jobs/10/eval.json"]
    store.put_bytes("jobs/1/eval.json", b'{"ppl": 2}')  # a re-run overwrites
    assert store.get_bytes("jobs/1/eval.json") == b'{"ppl": 2}'
    store.download_file("jobs/1/model.safetensors", tmp_path / "down" / "m.bin")
    assert (tmp_path / "down" / "m.bin").read_bytes() == src.read_bytes()
    with pytest.raises(InputError, match="does not exist"):
        store.get_bytes("jobs/2/eval.json")


def test_uris(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    assert LocalStore(tmp_path).uri("jobs/1/a.json") == str(tmp_path.resolve() / "jobs/1/a.json")
    assert (
        S3Store(s3_bucket, "/p/q/", endpoint_url=s3_endpoint).uri("jobs/1/a.json")
        == f"s3://{s3_bucket}/p/q/jobs/1/a.json"
    )


@pytest.mark.parametrize(
    "key", ["", "/etc/passwd", "../up", "jobs/../../up", "jobs//x", "jobs/./x", "a\\b", "dir/"]
)
def test_unsafe_keys_are_refused(store: LocalStore | S3Store, key: str) -> None:
    with pytest.raises(InputError, match="object key"):
        store.put_bytes(key, b"x")


def test_local_store_never_leaves_partial_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    missing = tmp_path / "missing.bin"
    with pytest.raises(FileNotFoundError):
        store.put_file("jobs/1/a.bin", missing)
    assert store.list("") == [] and not any((tmp_path / "objects").rglob("*.part"))


def test_large_files_go_up_in_parts(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    big = tmp_path / "big.safetensors"
    big.write_bytes(os.urandom(20 * 1024 * 1024))
    S3Store(s3_bucket, endpoint_url=s3_endpoint).put_file("jobs/1/big.safetensors", big)
    head = boto3.client("s3", endpoint_url=s3_endpoint).head_object(
        Bucket=s3_bucket, Key="jobs/1/big.safetensors"
    )
    assert head["ETag"].strip('"').endswith("-3")  # 20 MiB in 8 MiB parts
    assert head["ContentLength"] == big.stat().st_size
    data = S3Store(s3_bucket, endpoint_url=s3_endpoint).get_bytes("jobs/1/big.safetensors")
    assert hashlib.sha256(data).digest() == hashlib.sha256(big.read_bytes()).digest()


def test_open_store(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s3 = open_store("s3://bucket/some/prefix", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    with pytest.raises(InputError, match="not supported"):
        open_store("gs://bucket/prefix")
    assert check_key("jobs/1/a.json") == "jobs/1/a.json"


# ---- input URIs -----------------------------------------------------------------------------------


@pytest.fixture
def policy(tmp_path: Path, s3_endpoint: str) -> InputPolicy:
    root = tmp_path / "allowed"
    (root / "model").mkdir(parents=True)
    (root / "model" / "config.json").write_text("{}")
    (root / "data.txt").write_text("text")
    return InputPolicy((root,), ("inputs",), s3_endpoint)


def test_local_paths_inside_the_roots_are_accepted(policy: InputPolicy) -> None:
    root = policy.allowed_roots[0]
    assert parse_input_uri(str(root / "model"), policy) == LocalInput(root / "model")
    assert parse_input_uri(f"file://{root}/data.txt", policy) == LocalInput(root / "data.txt")
    assert check_input_exists(str(root / "model"), policy, kind="dir", what="model") == LocalInput(
        root / "model"
    )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://169.254.169.254/latest/meta-data/", "scheme 'http', which is not allowed"),
        ("https://example.com/model", "scheme 'https'"),
        ("ftp://example.com/x", "scheme 'ftp'"),
        ("/etc/passwd", "outside the allowed roots"),
        ("file://evil.example.com/etc/passwd", "must not name a host"),
        ("relative/path", "is relative"),
        ("s3://other-bucket/model", "bucket 'other-bucket' is not allowed"),
        ("s3://inputs/../secrets", "'..'"),
        ("s3://inputs", "must look like s3://bucket/key"),
        ("", "empty"),
    ],
)
def test_uris_outside_the_allow_list_are_refused(policy: InputPolicy, uri: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_input_uri(uri, policy, what="model")


def test_path_escapes_through_dotdot_and_symlinks_are_refused(policy: InputPolicy, tmp_path: Path) -> None:
    root = policy.allowed_roots[0]
    with pytest.raises(InputError, match="outside the allowed roots"):
        parse_input_uri(f"{root}/../secret.txt", policy)
    (tmp_path / "secret.txt").write_text("s")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(InputError, match="outside the allowed roots"):
        parse_input_uri(str(root / "link.txt"), policy)


def test_missing_inputs(policy: InputPolicy) -> None:
    root = policy.allowed_roots[0]
    with pytest.raises(InputError, match="not a model directory"):
        check_input_exists(str(root), policy, kind="dir", what="model")
    with pytest.raises(InputError, match="does not exist"):
        check_input_exists(str(root / "nope.txt"), policy, kind="file", what="calibration")
    with pytest.raises(InputError, match="does not exist"):
        check_input_exists("s3://inputs/models/none", policy, kind="dir", what="model")


def test_s3_inputs_are_checked_and_downloaded_once(
    policy: InputPolicy, s3_endpoint: str, tmp_path: Path
) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="inputs")
    s3.put_object(Bucket="inputs", Key="models/tiny/config.json", Body=b'{"a": 1}')
    s3.put_object(Bucket="inputs", Key="models/tiny/model.safetensors", Body=b"weights")
    s3.put_object(Bucket="inputs", Key="data/cal.txt", Body=b"calibration text")
    found = check_input_exists("s3://inputs/models/tiny", policy, kind="dir", what="model")
    assert found == S3Input("inputs", "models/tiny", "s3://inputs/models/tiny")
    cache = tmp_path / "cache"
    model = materialize("s3://inputs/models/tiny/", policy, cache, kind="dir")
    assert (model / "config.json").read_bytes() == b'{"a": 1}' and (
        model / "model.safetensors"
    ).read_bytes() == b"weights"
    text = materialize("s3://inputs/data/cal.txt", policy, cache, kind="file")
    assert text.read_bytes() == b"calibration text"
    s3.delete_object(Bucket="inputs", Key="data/cal.txt")  # cached: no second download
    assert (
        materialize("s3://inputs/data/cal.txt", policy, cache, kind="file").read_bytes()
        == b"calibration text"
    )
