"""Real servers for tests, on 127.0.0.1 only, always stopped: a local S3 (moto's standalone
server, as s3fs's own test suite uses) and a local Ray cluster.

``S3`` gives the storage options that point s3fs at the server (``client_kwargs.endpoint_url``)
with made-up credentials (moto accepts any); tests hand them to :func:`convert.storage.configure`
in-process, and to CLI subprocesses as ``--storage-options`` or ``CONVERT_STORAGE_OPTIONS``.
"""

from __future__ import annotations

import itertools
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass

_buckets = itertools.count()

FAKE_KEY, FAKE_SECRET = "AKIATESTKEYFORMOTO01", "test-secret-value-that-must-never-be-printed"


@dataclass
class S3:
    endpoint: str

    @property
    def options(self) -> dict:
        return {"key": FAKE_KEY, "secret": FAKE_SECRET,
                "client_kwargs": {"endpoint_url": self.endpoint},
                "config_kwargs": {"retries": {"max_attempts": 2}}}

    @property
    def options_json(self) -> str:
        return json.dumps(self.options)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options, skip_instance_cache=True)

    def new_bucket(self, stem: str = "test") -> str:
        name = f"{stem}-{next(_buckets)}"
        self.fs().mkdir(name)
        return name

    def pending_uploads(self, bucket: str) -> list:
        return self.fs().call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) or []


@contextmanager
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3(f"http://{host}:{port}")
    finally:
        server.stop()
