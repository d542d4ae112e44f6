"""The update repository over HTTP: read-only, without login, in the TUF layout (consistent snapshots).

``GET /updates/metadata/{N}.root.json``, ``/updates/metadata/timestamp.json``,
``/updates/metadata/{N}.snapshot.json``, ``/updates/metadata/{N}.{role}.json`` and
``/updates/targets/<dir>/{sha256}.{name}`` - exactly the files
:meth:`fleet_server.updates.repository.UpdateRepository.read_file` serves (the MQTT fetch handler
reads the same ones); anything else is 404.  The files are signed TUF metadata and signed-for
targets, so they need no login; they carry no secret (the model packages are encrypted).
"""

from __future__ import annotations

import time

from flask import Blueprint, Response

from fleet_server.console.rbac import public
from fleet_server.console.security import error_response
from fleet_server.console.services import services
from fleet_server.updates.repository import UpdateRepository

bp = Blueprint("updates", __name__)


def _serve(path: str, mimetype: str) -> Response:
    config = services().config
    data = UpdateRepository(config.updates.dir, config.updates, clock=time.time).read_file(path)
    if data is None:
        return error_response(404)
    return Response(data, mimetype=mimetype)


@bp.get("/metadata/<name>")
@public
def metadata(name: str) -> Response:
    return _serve(f"metadata/{name}", "application/json")


@bp.get("/targets/<path:path>")
@public
def target(path: str) -> Response:
    return _serve(f"targets/{path}", "application/octet-stream")
