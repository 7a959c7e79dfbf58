"""Fixtures shared by the test files: real servers on loopback (an S3-protocol endpoint, moto's server mode) and
``faulty://`` folders."""

from __future__ import annotations

import os
import uuid

import pytest


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server on 127.0.0.1 (moto's server mode, as s3fs's own tests use).

    Exports the endpoint and test credentials to this process and to the processes it starts.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "FSSPEC_S3_ENDPOINT_URL")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        FSSPEC_S3_ENDPOINT_URL=f"http://{host}:{port}",
    )
    import fsspec.config

    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = f"http://{host}:{port}"  # env is read at import
    yield f"http://{host}:{port}"
    fsspec.config.conf["s3"].pop("endpoint_url", None)
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_url(s3_endpoint):
    """A fresh bucket on the test S3 server, as an s3:// URL."""
    import fsspec

    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/run"


@pytest.fixture
def faulty_url(tmp_path):
    """``faulty://<tmp_path>/ckpt``, known to fsspec in this process (trainers started through the fleet register
    it in theirs: :func:`torchx_diloco._fleet.testing.train_module_args`)."""
    from torchx_diloco._fleet import faulty

    faulty.register()
    return f"faulty://{tmp_path}/ckpt"
