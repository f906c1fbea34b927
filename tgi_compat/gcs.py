"""Vertex AI's model download: ``AIP_STORAGE_URI=gs://bucket/prefix`` copied to a local
directory before anything starts, as Google's TGI container does in its entrypoint
(``gcloud storage cp "$AIP_STORAGE_URI/*" /tmp/model --recursive``, then ``MODEL_ID=/tmp/model``).

With ``google-cloud-storage``: credentials are Application Default Credentials (on Vertex AI
the service account of the deployment), or none when ``STORAGE_EMULATOR_HOST`` points at an
emulator. Every call is bounded: socket connect/read timeouts and a retry deadline of
``timeout`` seconds each. Objects go into a fresh directory beside the target that is
renamed into place only when every object arrived, and removed on any failure: no
half-written model is ever served.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

logger = logging.getLogger("tgi_compat")


class DownloadError(Exception):
    """The model could not be downloaded: one line for the operator, exit status 1."""


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/some/prefix`` -> ("bucket", "some/prefix") (prefix without slashes at its ends).
    Raises ValueError for anything else."""
    if not uri.startswith("gs://"):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, prefix = uri.removeprefix("gs://").partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, prefix.strip("/")


def default_target(uri: str) -> Path:
    """Where a URI's model lives locally: under the temporary directory (``TMPDIR``), one
    directory per bucket and prefix."""
    bucket, prefix = parse_gs_uri(uri)
    return Path(tempfile.gettempdir()) / "tgi-compat-gcs" / bucket / (prefix or "_root")


def download_model(uri: str, *, timeout: float = 60.0, target: Path | None = None, workers: int = 8) -> Path:
    """Copy every object under ``uri`` (relative paths kept) to ``target`` and return it.

    Raises ``DownloadError`` (no objects under the prefix, an object name escaping the
    directory, a missing bucket, a network or permission failure, a timeout).
    """
    from google.api_core import exceptions as api_exceptions
    from google.api_core.retry import Retry
    from google.auth import exceptions as auth_exceptions
    from google.cloud import storage
    from google.cloud.storage import transfer_manager
    from google.cloud.storage.retry import DEFAULT_RETRY

    bucket_name, prefix = parse_gs_uri(uri)
    target = target or default_target(uri)
    retry: Retry = DEFAULT_RETRY.with_timeout(timeout)
    request_timeout = (timeout, timeout)  # (connect, read between bytes): a stalled socket fails
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        client = storage.Client()
        bucket = client.bucket(bucket_name)
        list_prefix = f"{prefix}/" if prefix else ""
        pairs = []
        total = 0
        for blob in client.list_blobs(bucket, prefix=list_prefix, timeout=request_timeout, retry=retry):
            relative = blob.name[len(list_prefix):]
            if not relative or relative.endswith("/"):  # "directory" placeholder objects
                continue
            path = PurePosixPath(relative)
            if path.is_absolute() or ".." in path.parts:
                raise DownloadError(f"object {blob.name!r} in {uri} would be written outside the model directory")
            dest = partial.joinpath(*path.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            pairs.append((blob, str(dest)))
            total += blob.size or 0
        if not pairs:
            raise DownloadError(f"no objects under {uri}")
        logger.info("downloading %d objects (%.1f MB) from %s", len(pairs), total / 1e6, uri)
        transfer_manager.download_many(
            pairs,
            download_kwargs={"timeout": request_timeout, "retry": retry},
            worker_type=transfer_manager.THREAD,
            max_workers=workers,
            raise_exception=True,
        )
        _replace_dir(partial, target)
    except DownloadError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except (api_exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError, OSError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise DownloadError(f"cannot download {uri}: {_reason(e)}") from e
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("downloaded %s to %s in %.1f s", uri, target, time.monotonic() - started)
    return target


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; a previous download there is replaced (renamed away first,
    so ``target`` is never a mix of two downloads)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "model")
        shutil.rmtree(old, ignore_errors=True)
    os.replace(new, target)


def _reason(e: BaseException) -> str:
    """One line: the API's own message, else the innermost cause (a refused connection...)."""
    message = getattr(e, "message", None) or str(e)
    cause = getattr(e, "cause", None)  # a RetryError's last failure: say what kept failing
    if cause is not None:
        message = f"{message}; last error: {type(cause).__name__}: {cause}"
    return " ".join(f"{type(e).__name__}: {message}".split())[:500]
