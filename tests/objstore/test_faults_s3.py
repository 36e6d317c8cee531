"""Faults between torchckpt and an S3 server: retried when transient, a clear error and nothing committed when not.

The client talks to moto's S3 server through :class:`~s3_proxy.FaultProxy`
(``AWS_ENDPOINT_URL`` names the proxy), which answers chosen requests with
500 / 503 / 403 or resets their connection. Standard outcome
(shared/RELIABILITY.md), for an object store:

- a few transient faults (5xx, dropped connections) on segment uploads, ranged
  GETs and the commit are retried by the client: the save and the load
  succeed and are exact;
- persistent faults fail the save or the load with a ``CheckpointIOError``
  (an ``OSError``) whose message names the URL and the operation, within a
  bounded time (the tests shrink the client's retry budget: ``FAST_RETRIES``);
  the previous checkpoint still loads exactly and no new marker appears;
- refused credentials and a missing bucket say so, naming the URL.

SIGKILLed writers, racing writers and readers racing an overwrite are in
``test_races_s3.py``.
"""

from __future__ import annotations

import errno
import http.client
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from ckpt_testutil import assert_state_equal
from s3_fault_util import committed, load, multipart_uploads, random_state, use_fast_retries, writer
from s3_proxy import FaultProxy
from s3_testutil import MotoServer, s3_env

from torchckpt.errors import CheckpointIOError, CheckpointNotFoundError
from torchckpt.format.manifest import MANIFEST_NAME
from torchckpt.storage import object_client
from torchckpt.storage.object_storage import ObjectStorage

#: A state whose rank file is two segments (segments are 32 MiB): ``.seg00001`` and the first, put at sync.
MIB = 40
#: Longest a save or a load may take to fail with the test's retry budget.
FAIL_WITHIN_S = 30.0
PART = r"\.seg\d{5}$"
RANK_FILE = r"/gen-[^/]+/(rank_00000\.safetensors|checkpoint_0\.pt)"
FIRST = RANK_FILE + "$"
MARKER = r"/manifest\.json$"


@pytest.fixture
def proxy(moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's moto server; the client's endpoint is the proxy."""
    with FaultProxy(moto_server.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        monkeypatch.setattr(object_client, "_stores", {})  # no client made for the server itself
        yield p


@pytest.fixture
def url(s3_bucket: str) -> str:
    return f"{s3_bucket}/ckpt"


def _bucket(url: str) -> str:
    return url.split("/")[2]


def _assert_names(err: BaseException, url: str, *words: str) -> None:
    text = str(err)
    assert url in text, f"the error does not name {url}: {text}"
    for w in words:
        assert w in text, f"the error does not say {w!r}: {text}"


def _assert_only(url: str, state: dict[str, Any], mark: tuple[str, str]) -> None:
    """``url`` holds exactly ``state``, committed as ``mark``, and no other generation."""
    assert committed(url) == mark, "a new marker appeared (or the old one changed)"
    assert_state_equal(load(url), state)
    assert ObjectStorage(url).generations() == [mark[0]]


# -- a. transient faults are retried ------------------------------------------------------------

SAVE_FAULTS = {
    "503 x3 on segment PUTs": lambda p: p.fail(503, method="PUT", path=PART, times=3),
    "500 x2 on segment PUTs": lambda p: p.fail(500, method="PUT", path=PART, times=2),
    "reset x2 on segment PUTs, nothing sent": lambda p: p.reset(method="PUT", path=PART, times=2),
    "reset x2 on segment PUTs after 1 MiB sent":
        lambda p: p.reset(method="PUT", path=PART, times=2, after_body_bytes=1 << 20),
    "503 x2 on the first segment's PUT (at sync)": lambda p: p.fail(503, method="PUT", path=FIRST, times=2),
    "reset on the first segment's PUT, its answer lost":
        lambda p: p.reset(method="PUT", path=FIRST, after_answer_bytes=0),
    "503 x2 on the commit": lambda p: p.fail(503, method="PUT", path=MARKER, times=2),
    "reset on the commit, nothing sent": lambda p: p.reset(method="PUT", path=MARKER, after_body_bytes=0),
    "reset on the commit, its answer lost": lambda p: p.reset(method="PUT", path=MARKER, after_answer_bytes=0),
    "500 on the survey's HEAD and list":
        lambda p: (p.fail(500, method="HEAD", path=MARKER), p.fail(500, method="GET", path=r"list-type=2")),
}  # fmt: skip


@pytest.mark.parametrize("fmt", ["safetensors", "torch_save"])
@pytest.mark.parametrize("fault", sorted(SAVE_FAULTS))
def test_transient_faults_of_a_save_are_retried(proxy: FaultProxy, url: str, fault: str, fmt: str) -> None:
    old = random_state(1, 1)
    writer(fmt).write(url, old)
    armed = SAVE_FAULTS[fault](proxy)
    armed = armed if isinstance(armed, tuple) else (armed,)
    new = random_state(2, MIB)
    writer(fmt).write(url, new)
    for f in armed:
        assert f.hits == f.times, f"{fault}: the fault acted {f.hits} times, armed for {f.times}"
    assert_state_equal(load(url), new)
    storage = ObjectStorage(url)
    assert storage.generations() == [committed(url)[0]]  # the old generation was deleted after the commit
    assert storage.leftovers(MANIFEST_NAME) == {}
    assert multipart_uploads(proxy.upstream_endpoint, _bucket(url)) == []
    if "segment PUTs" in fault:  # every faulted segment was sent again, and the first one went up
        assert len(proxy.requests("PUT", PART)) == 1 + armed[0].times
        assert proxy.requests("PUT", FIRST)[-1].outcome == "forward"


def test_the_first_commit_at_a_url_whose_answer_is_lost_took_effect(proxy: FaultProxy, url: str) -> None:
    """The commit's conditional put (If-None-Match: the URL is empty) served and its answer lost: the save succeeds."""
    lost = proxy.reset(method="PUT", path=MARKER, after_answer_bytes=0)
    state = random_state(21, 1)
    writer().write(url, state)
    assert lost.hits == 1
    (put,) = proxy.requests("PUT", MARKER)  # not sent again: the marker read back names the save's generation
    assert put.headers.get("if-none-match") == "*"
    assert_state_equal(load(url), state)
    assert ObjectStorage(url).generations() == [committed(url)[0]]


LOAD_FAULTS = {
    "503 x3 on ranged GETs": lambda p: p.fail(503, method="GET", path=RANK_FILE, times=3),
    "500 x2 on ranged GETs": lambda p: p.fail(500, method="GET", path=RANK_FILE, times=2),
    "reset x2 on ranged GETs": lambda p: p.reset(method="GET", path=RANK_FILE, times=2),
    "reset x2 on ranged GETs 100 kB into the answer":
        lambda p: p.reset(method="GET", path=RANK_FILE, times=2, after_answer_bytes=100_000),
    "503 on the marker's GET": lambda p: p.fail(503, method="GET", path=MARKER, times=1),
    "503 on the rank file's HEAD": lambda p: p.fail(503, method="HEAD", path=RANK_FILE, times=1),
}


@pytest.mark.parametrize("fmt", ["safetensors", "torch_save"])
@pytest.mark.parametrize("fault", sorted(LOAD_FAULTS))
def test_transient_faults_of_a_load_are_retried(proxy: FaultProxy, url: str, fault: str, fmt: str) -> None:
    state = random_state(3, MIB)
    writer(fmt).write(url, state)
    armed = LOAD_FAULTS[fault](proxy)
    assert_state_equal(load(url), state)
    assert armed.hits == armed.times


# -- b. persistent faults: a clear error in bounded time, nothing committed ------------------------


def _save_fails(url: str, state: dict[str, Any], fmt: str = "safetensors") -> CheckpointIOError:
    started = time.monotonic()
    with pytest.raises(CheckpointIOError) as info:
        writer(fmt).write(url, state)
    elapsed = time.monotonic() - started
    assert elapsed < FAIL_WITHIN_S, f"the save took {elapsed:.1f}s to fail"
    assert isinstance(info.value, OSError) and info.value.errno is not None
    return info.value


#: Each fault, the operation the error names (``CheckpointIOError.operation``) and the words its message says.
PERSISTENT = {
    "every PUT answers 500": (lambda p: p.fail(500, method="PUT", times=None), "fsync", "upload"),
    "every segment PUT is reset": (lambda p: p.reset(method="PUT", path=PART, times=None), "fsync", "upload"),
    "the commit answers 503": (lambda p: p.fail(503, method="PUT", path=MARKER, times=None), "commit", "commit failed"),
    "every request is reset": (lambda p: p.reset(times=None), "prepare", "cannot save to"),
}  # fmt: skip


@pytest.mark.parametrize("fault", sorted(PERSISTENT))
def test_persistent_faults_fail_the_save_clearly_and_commit_nothing(
    proxy: FaultProxy, url: str, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = random_state(5, 2)
    writer().write(url, old)
    mark = committed(url)
    use_fast_retries(monkeypatch)
    arm, operation, words = PERSISTENT[fault]
    armed = arm(proxy)
    err = _save_fails(url, random_state(6, MIB))
    print(f"{fault}: {err}")
    assert armed.hits > 0
    assert err.operation == operation, f"{fault}: operation {err.operation!r} ({err})"
    _assert_names(err, url, words)
    assert err.errno == errno.EIO
    proxy.clear()
    _assert_only(url, old, mark)
    assert ObjectStorage(url).leftovers(MANIFEST_NAME) == {}
    assert multipart_uploads(proxy.upstream_endpoint, _bucket(url)) == []


def test_a_commit_whose_outcome_is_unknown_keeps_its_generation(
    proxy: FaultProxy, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marker's put took effect but its answer was lost, and the marker cannot be read back.

    The save fails saying the outcome is unknown, and keeps its generation:
    the marker names it, so deleting it would leave a marker without objects.
    """
    writer().write(url, random_state(17, 1))
    use_fast_retries(monkeypatch)
    lost = proxy.reset(method="PUT", path=MARKER, after_answer_bytes=0)
    unreadable = proxy.fail(503, method="GET", path=MARKER, times=None)
    new = random_state(18, 2)
    err = _save_fails(url, new)
    assert lost.hits == 1 and unreadable.hits > 0
    assert err.operation == "commit" and err.errno == errno.EIO
    _assert_names(err, url, "the store cannot say whether the commit took effect")
    proxy.clear()
    assert_state_equal(load(url), new)  # it did take effect, and its objects are all there
    assert len(ObjectStorage(url).generations()) == 2  # the old one too: the commit did not clean up
    writer().write(url, new)
    assert len(ObjectStorage(url).generations()) == 1
    assert ObjectStorage(url).leftovers(MANIFEST_NAME) == {}


def test_every_request_reset_fails_a_load_clearly(proxy: FaultProxy, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    state = random_state(7, 2)
    writer().write(url, state)
    use_fast_retries(monkeypatch)
    proxy.reset(times=None)
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        load(url)
    assert time.monotonic() - started < FAIL_WITHIN_S
    _assert_names(info.value, f"{url}/{MANIFEST_NAME}", "read")
    assert info.value.errno == errno.EIO
    proxy.clear()
    assert_state_equal(load(url), state)


def test_ranged_gets_failing_for_good_fail_the_load_clearly(
    proxy: FaultProxy, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = random_state(8, MIB)
    writer().write(url, state)
    use_fast_retries(monkeypatch)
    proxy.fail(503, method="GET", path=RANK_FILE, times=None)
    with pytest.raises(OSError) as info:
        load(url)
    _assert_names(info.value, url, "rank_00000.safetensors")
    proxy.clear()
    assert_state_equal(load(url), state)


def test_the_network_cut_mid_upload_commits_nothing(
    proxy: FaultProxy, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request reset from the moment the first part is on its way: the save fails, the old checkpoint stays."""
    old = random_state(9, 2)
    writer().write(url, old)
    mark = committed(url)
    use_fast_retries(monkeypatch)
    errors: list[BaseException] = []
    thread = threading.Thread(target=_save_into, args=(url, random_state(10, 3 * 32 + 8), errors))
    thread.start()
    _wait_for(lambda: proxy.requests("PUT", PART), "the first segment upload")
    proxy.reset(times=None)
    thread.join(FAIL_WITHIN_S)
    assert not thread.is_alive(), f"the save did not end within {FAIL_WITHIN_S}s of the cut"
    assert len(errors) == 1 and isinstance(errors[0], CheckpointIOError), errors
    _assert_names(errors[0], url)
    proxy.clear()
    assert committed(url) == mark
    assert_state_equal(load(url), old)
    # the failed save could not delete its generation while cut off: the next save does
    writer().write(url, old)
    assert ObjectStorage(url).leftovers(MANIFEST_NAME) == {}
    assert len(ObjectStorage(url).generations()) == 1


def test_the_server_stopped_mid_upload_fails_the_save_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto itself stops while a large save uploads from a thread: the save fails within the bound, naming the URL."""
    use_fast_retries(monkeypatch)
    with MotoServer() as server, FaultProxy(server.endpoint) as watch:
        for k, v in s3_env(watch.endpoint).items():
            monkeypatch.setenv(k, v)
        url = f"s3://{server.bucket()}/ckpt"
        writer().write(url, random_state(11, 1))
        errors: list[BaseException] = []
        thread = threading.Thread(target=_save_into, args=(url, random_state(12, 3 * 32 + 8), errors))
        thread.start()
        _wait_for(lambda: watch.requests("PUT", PART), "the first segment upload")
        server.stop()
        thread.join(FAIL_WITHIN_S)
        assert not thread.is_alive(), f"the save did not end within {FAIL_WITHIN_S}s of the server's stop"
    assert len(errors) == 1 and isinstance(errors[0], CheckpointIOError), errors
    _assert_names(errors[0], url)
    assert errors[0].errno == errno.EIO


def _save_into(url: str, state: dict[str, Any], errors: list[BaseException]) -> None:
    try:
        writer().write(url, state)
    except BaseException as e:  # noqa: BLE001 - the test checks it
        errors.append(e)


def _wait_for(cond: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s}s"
        time.sleep(0.005)


# -- f. refused credentials, a missing bucket -----------------------------------------------------


@pytest.mark.parametrize("code", ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_a_403_says_access_denied_for_save_and_load(proxy: FaultProxy, url: str, code: str) -> None:
    """The proxy answers 403 (moto accepts any credentials): EACCES, "access denied", the URL and the operation."""
    state = random_state(13, 1)
    writer().write(url, state)
    proxy.fail(403, code=code, times=None)
    err = _save_fails(url, state)
    assert err.errno == errno.EACCES
    assert err.operation == "prepare"
    _assert_names(err, url, "access denied (check the credentials)")
    with pytest.raises(PermissionError) as info:
        load(url)
    _assert_names(info.value, f"{url}/{MANIFEST_NAME}", "read", "access denied (check the credentials)")
    proxy.clear()
    assert_state_equal(load(url), state)


def test_a_refused_listing_says_access_denied(proxy: FaultProxy, url: str) -> None:
    """Credentials that may read and write but not list (no ``s3:ListBucket``): EACCES, not a generic I/O error."""
    writer().write(url, random_state(19, 1))
    proxy.fail(403, method="GET", path=r"list-type=2", code="AccessDenied", times=None)
    err = _save_fails(url, random_state(20, 1))
    assert err.errno == errno.EACCES and err.operation == "prepare"
    _assert_names(err, url, "list", "access denied (check the credentials)")
    with pytest.raises(PermissionError) as info:
        ObjectStorage(url).generations()
    _assert_names(info.value, url, "list", "access denied (check the credentials)")


@pytest.fixture(scope="module")
def auth_server() -> Iterator[tuple[MotoServer, str, dict[str, str]]]:
    """A moto server that checks credentials: a bucket, and an IAM user's key allowed every S3 action."""
    import boto3

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "8")  # the setup below; every later request is checked
        server = MotoServer().start()
    try:
        bucket = server.bucket()
        iam = boto3.client(
            "iam", endpoint_url=server.endpoint, region_name="us-east-1",
            aws_access_key_id="setup", aws_secret_access_key="setup",
        )  # fmt: skip
        iam.create_user(UserName="trainer")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        _use_up_unchecked_requests(server, bucket)
        yield server, bucket, {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        server.stop()


def _use_up_unchecked_requests(server: MotoServer, bucket: str) -> None:
    for _ in range(10):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("GET", f"/{bucket}")  # unsigned: refused once credentials are checked
            status = conn.getresponse().status
        finally:
            conn.close()
        if status != 200:
            return
    raise AssertionError("moto does not check credentials")


@pytest.mark.parametrize("wrong", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials_fail_save_and_load_naming_the_url(
    auth_server: tuple[MotoServer, str, dict[str, str]], monkeypatch: pytest.MonkeyPatch, wrong: str
) -> None:
    server, bucket, creds = auth_server
    for k, v in {**s3_env(server.endpoint), **creds}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(object_client, "_stores", {})
    url = f"s3://{bucket}/wrong-{wrong.lower()}"
    state = random_state(14, 1)
    writer().write(url, state)  # the right credentials work
    assert_state_equal(load(url), state)

    monkeypatch.setenv(wrong, "AKIAWRONGWRONGWRONG0" if wrong == "AWS_ACCESS_KEY_ID" else "not-the-secret")
    monkeypatch.setattr(object_client, "_stores", {})
    err = _save_fails(url, random_state(15, 1))
    assert err.errno == errno.EACCES and err.operation == "prepare"
    _assert_names(err, url, "access denied (check the credentials)")
    with pytest.raises(PermissionError) as info:
        load(url)
    _assert_names(info.value, f"{url}/{MANIFEST_NAME}", "read", "access denied (check the credentials)")


def test_a_missing_bucket_fails_save_and_load_naming_the_url(moto_server: MotoServer, s3_bucket: str) -> None:
    url = "s3://torchckpt-no-such-bucket/ckpt"
    err = _save_fails(url, random_state(16, 1))
    assert err.errno == errno.ENOENT and err.operation == "prepare"
    _assert_names(err, url, "the bucket does not exist")
    with pytest.raises(CheckpointNotFoundError) as info:
        load(url)
    _assert_names(info.value, url, "the bucket does not exist")
