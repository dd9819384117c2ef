"""moto's S3 server over real HTTP, for benchmarks and integration tests: boto3 (and every Ray
worker started after it, which inherits the environment) talks to it like to AWS."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import boto3
from botocore.config import Config

CREDENTIALS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
}
CLEARED_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@contextlib.contextmanager
def fake_aws_credentials() -> Iterator[None]:
    """boto3's standard credential chain, fed by the environment; nothing real is read."""
    saved = {name: os.environ.get(name) for name in (*CREDENTIALS_ENV, *CLEARED_ENV)}
    os.environ.update(CREDENTIALS_ENV)
    for name in CLEARED_ENV:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class MotoS3:
    """A running server: `endpoint`, a boto3 `client`, `stop()`/`start()` to take S3 down and up."""

    def __init__(self, port: int = 0) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, config=Config(retries={"total_max_attempts": 1}))
        self.running = True

    def put_adapter(self, bucket: str, key_prefix: str, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            self.client.put_object(Bucket=bucket, Key=f"{key_prefix}/{name}", Body=data)

    def stop(self) -> None:
        """Take S3 down (the port is closed, connections are refused). moto keeps its state."""
        if self.running:
            self._server.stop()
            inner = getattr(self._server, "_server", None)
            if inner is not None:
                inner.server_close()
            self.running = False

    def start(self) -> None:
        """Bring S3 back on the same port, with the same buckets and objects."""
        if not self.running:
            from moto.server import ThreadedMotoServer

            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
            self.running = True


@contextlib.contextmanager
def moto_s3_server() -> Iterator[MotoS3]:
    with fake_aws_credentials():
        server = MotoS3()
        try:
            yield server
        finally:
            server.stop()
