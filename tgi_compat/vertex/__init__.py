"""Google Vertex AI: TGI's ``POST /vertex`` route (``api_router``) and the ``AIP_*``
variables Vertex AI sets on a container (``env``); the model download from
``AIP_STORAGE_URI`` is ``tgi_compat/gcs.py``."""
