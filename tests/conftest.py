"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


class ForeignOutputs:
    """One small output of each writable format, written once per session (the contract's
    'detect rejects other formats' test needs them for every format under test)."""

    def __init__(self, root: Path):
        self.root = root
        self._paths: dict[str, Path] = {}

    def __getitem__(self, fmt: str) -> Path:
        if fmt not in self._paths:
            import convert

            from contract import samples

            info, writer = convert.registry.writer(fmt)
            out = self.root / (f"foreign-{info.name}" + writer.suffix)
            convert.write(samples()["names"], out, info.name)
            self._paths[fmt] = out
        return self._paths[fmt]


@pytest.fixture(scope="session")
def foreign_outputs(tmp_path_factory) -> ForeignOutputs:
    return ForeignOutputs(tmp_path_factory.mktemp("foreign"))


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 (moto's server on 127.0.0.1, a free port), stopped at the end of the session."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from servers import s3_server as serve

    with serve() as s3:
        yield s3


@pytest.fixture
def s3(s3_server):
    """The local S3, configured as this process's storage options for the test."""
    from convert import storage

    before = storage.configured()
    storage.configure({"s3": s3_server.options})
    try:
        yield s3_server
    finally:
        storage.configure(before)


@pytest.fixture
def commit_order(monkeypatch):
    """The names of the remote uploads in the order they are completed (made visible)."""
    from convert import outputs

    order: list[str] = []
    real = outputs._Upload.commit

    def commit(self):
        order.append(self.target.name)
        real(self)
    monkeypatch.setattr(outputs._Upload, "commit", commit)
    return order
