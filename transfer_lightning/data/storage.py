"""LitData and the object stores it reaches: the extra that brings it, plain-http endpoints, its clients, and
one line for whatever goes wrong on the way to a bucket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transfer_lightning.errors import UserInputError

#: Prefixes of the object stores LitData reads and writes.
REMOTE_PREFIXES = ("s3://", "gs://", "r2://")
#: What to install when LitData is missing.
MISSING_LITDATA = "Optimized data sets need LitData: install the stream extra (pip install -e '.[stream]')."


def require_litdata() -> Any:
    """The ``litdata`` module, or one line naming the extra that brings it."""
    try:
        import litdata
    except ImportError:
        raise UserInputError(MISSING_LITDATA) from None
    _allow_plain_http()
    return litdata


def _allow_plain_http() -> None:
    """Let LitData's obstore client follow an ``http://`` ``endpoint_url`` as its boto3 client does.

    LitData (0.2.7x) fetches and uploads chunks with obstore, whose client refuses plain http unless told, and it
    passes no way to tell it: a local MinIO or moto server on ``http://127.0.0.1`` then fails with "builder
    error". ``allow_http`` only permits what the user's own ``endpoint_url`` says; https endpoints are unchanged.
    """
    from litdata.streaming import downloader

    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict) and "allow_http" not in options:
        downloader._OBSTORE_CLIENT_OPTIONS = {**options, "allow_http": True}


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIXES)


def storage_provider(url: str, storage_options: dict[str, Any] | None, patient: bool = True) -> Any:
    """LitData's client of the object store ``url`` is on (S3, GCS, R2), configured as its streams are.

    LitData exports no public name for it (``_get_fs_provider`` in 0.2.x, hence the extra's range): using it, the
    info file, existence checks and clean-up reach the same stores with the same options as the chunks do. Not
    ``patient``, an S3 client gives up after 3 attempts: LitData's makes 1,000, so a mistyped endpoint would hang
    the first look at a data set for many minutes instead of saying so.
    """
    require_litdata()
    from litdata.streaming.fs_provider import _get_fs_provider

    options = dict(storage_options or {})
    if not patient and url.startswith(("s3://", "r2://")) and "config" not in options:
        import botocore.config

        options["config"] = botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10)
    return _get_fs_provider(url, options)


def download_file(url: str, local: Path, storage_options: dict[str, Any] | None) -> None:
    """Copy one object to ``local`` with LitData's storage client; errors said in one line."""
    try:
        storage_provider(url, storage_options, patient=False).download_file(url, str(local))
    except Exception as error:  # botocore, google and obstore errors share no base class
        raise UserInputError(describe_storage_error(error, url)) from None


def describe_storage_error(error: Exception, url: str) -> str:
    """One line for a failed read or write of ``url``, naming what to check."""
    name, text = type(error).__name__, str(error)
    if "NoCredentials" in name or "credentials" in text.lower():
        return (
            f"No credentials to reach {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
            "pass them in --data.storage_options."
        )
    if "404" in text or "NoSuch" in text or "Not Found" in text:
        return (
            f"{url} does not exist (is the bucket or the path mistyped?): it must be written by the optimize "
            "subcommand first."
        )
    if "403" in text or "AccessDenied" in text or "Forbidden" in text:
        return f"Access to {url} was refused (403): check the credentials' permissions on that bucket."
    if "Connect" in name or "Endpoint" in name or "Connection" in text:
        return f"Cannot connect to the storage server for {url} ({name}): check the endpoint_url and the network."
    return f"Cannot read {url}: {name}: {text.splitlines()[0] if text else ''}"
