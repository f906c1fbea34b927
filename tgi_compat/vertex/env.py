"""Vertex AI's container variables, read at start-up as TGI's Google image reads them.

- ``AIP_HTTP_PORT``: the port (TGI's ``google`` build: it wins over ``--port`` / ``PORT``).
- ``AIP_PREDICT_ROUTE`` / ``AIP_HEALTH_ROUTE``: extra paths for ``/vertex`` and the health
  check (TGI's ``google`` build mounts them, without ``--api-key``).
- ``AIP_STORAGE_URI=gs://...``: the model, downloaded before anything starts (Google's
  entrypoint exports ``MODEL_ID`` pointing at the copy, so it wins over ``MODEL_ID``; a
  ``--model-id`` on the command line still wins over both, as the launcher's flag does).

A Vertex deployment (any ``AIP_*`` variable set) without a model to serve is a
configuration error: it never falls back to the embedded test model.
Kept light (no web framework imports): it runs while flags are parsed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tgi_compat.config import ConfigError
from tgi_compat.gcs import parse_gs_uri


# Config fields set here rather than by a flag.
AIP_FIELDS = ("aip_predict_route", "aip_health_route", "storage_uri")


def apply_aip_env(values: dict[str, Any], sources: dict[str, str], environ: Mapping[str, str]) -> list[str]:
    """Fold the ``AIP_*`` variables into the parsed flag ``values`` (Config fields); returns
    start-up notices. Raises ``ConfigError``."""
    aip = {k: v for k, v in environ.items() if k.startswith("AIP_") and v != ""}
    if not aip:
        return []
    notices = []
    if (port := aip.get("AIP_HTTP_PORT")) is not None:
        try:
            value = int(port.strip())
        except ValueError:
            value = -1
        if not 0 < value < 65536:
            raise ConfigError(f"invalid value '{port}': not a port number for 'AIP_HTTP_PORT'")
        if "port" in sources and values["port"] != value:
            notices.append(f"AIP_HTTP_PORT={value} wins over `{sources['port']} {values['port']}` (Vertex AI's port)")
        values["port"], sources["port"] = value, "AIP_HTTP_PORT"
    for var, field in (("AIP_PREDICT_ROUTE", "aip_predict_route"), ("AIP_HEALTH_ROUTE", "aip_health_route")):
        if (route := aip.get(var)) is not None:
            if not route.startswith("/"):
                raise ConfigError(f"invalid value '{route}': a route must start with '/' for '{var}'")
            values[field] = route
    uri = aip.get("AIP_STORAGE_URI")
    if uri is not None:
        try:
            parse_gs_uri(uri)
        except ValueError as e:
            raise ConfigError(f"invalid value '{uri}': {e} for 'AIP_STORAGE_URI'") from None
    if sources.get("model_id") == "--model-id":
        if uri is not None:
            notices.append(f"`--model-id {values['model_id']}` wins over AIP_STORAGE_URI={uri}: nothing is downloaded")
        return notices
    if uri is not None:
        if values.get("model_id") is not None:
            notices.append(f"AIP_STORAGE_URI={uri} wins over {sources.get('model_id', 'MODEL_ID')}={values['model_id']}")
        values["model_id"], values["storage_uri"] = None, uri
        sources["model_id"] = "AIP_STORAGE_URI"
        return notices
    if values.get("model_id") is None:
        names = ", ".join(sorted(aip))
        raise ConfigError(
            f"Vertex AI variables are set ({names}) but no model is: set AIP_STORAGE_URI=gs://BUCKET/PATH "
            "(the model's files) or MODEL_ID; the embedded test model is never served on Vertex AI"
        )
    return notices
