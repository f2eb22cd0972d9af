"""Fixtures (loaded by conftest.py): a real S3 API on 127.0.0.1 for tests: moto's ThreadedMotoServer on a free port (as s3fs's own tests do).

``s3_bucket`` gives each test an empty bucket URL (``s3://<bucket>``); the fake credentials and the
endpoint are set as the usual AWS_* environment variables, so fsspec/s3fs in this process and in the
subprocesses a test starts reach the server without any storage option.
"""

from __future__ import annotations

import itertools
import logging
import socket

import pytest

_buckets = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
    pytest.importorskip("s3fs", reason="s3fs is a dev dependency (kdcache[s3])")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch) -> str:
    import fsspec

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    bucket = f"kdcache-test-{next(_buckets)}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}"
