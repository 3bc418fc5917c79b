"""The import registration API: pipelines tell the exporter about imports they start.

``POST /api/v1/imports`` starts tracking an import, ``DELETE
/api/v1/imports/{source}/{id}`` stops it, ``GET /api/v1/imports[/{source}/{id}]``
shows what the exporter knows, and ``GET /api/v1/openapi.json`` describes all of
it. The OpenAPI document is built from the same pydantic models that validate
requests and shape responses, so it cannot drift from what the handlers do.

Writes need ``Authorization: Bearer <token>`` with a token of ``api.tokens_file``
(without tokens the write API is off). Reads are protected like ``/metrics``
(the basic auth of ``--web.config.file``); a request under ``/api/`` carrying a
valid bearer token passes that basic auth too (see :func:`bearer_passes`).
This module only speaks HTTP and JSON: the exporter, behind
:class:`~exporter.tracking.ImportTracker`, decides.
"""

from exporter.api.auth import bearer_passes
from exporter.api.routes import add_api_routes

__all__ = ["add_api_routes", "bearer_passes"]
