"""A local Google Cloud Storage for the Vertex AI tests: ``gcp-storage-emulator`` in a
thread on loopback, and an uploader using the real ``google-cloud-storage`` client.
Nothing reaches Google: the client is pointed at the emulator with anonymous credentials,
and the server under test gets the same through ``STORAGE_EMULATOR_HOST``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

BUCKET = "models"


@contextlib.contextmanager
def gcs_emulator(bucket: str = BUCKET) -> Iterator[str]:
    """The emulator's URL (``http://127.0.0.1:PORT``), with ``bucket`` created, in memory."""
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
    finally:
        server.stop()


def upload_dir(url: str, local: Path, prefix: str, bucket: str = BUCKET) -> list[str]:
    """Every file under ``local`` to ``gs://bucket/prefix/<relative path>``; the object names."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": url})
    names = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        name = f"{prefix}/{path.relative_to(local).as_posix()}"
        client.bucket(bucket).blob(name).upload_from_filename(str(path), timeout=30)
        names.append(name)
    return names


def vertex_env(emulator_url: str, tmp: Path, **aip: str) -> dict[str, str]:
    """The variables of a Vertex AI container pointed at the emulator: ``AIP_*`` as given,
    the emulator, a project so that no metadata server is asked, ``TMPDIR`` for the download."""
    return {
        "STORAGE_EMULATOR_HOST": emulator_url,
        "GOOGLE_CLOUD_PROJECT": "test",
        "NO_GCE_CHECK": "True",  # google-auth never probes a metadata server
        "TMPDIR": str(tmp),
        **aip,
    }
