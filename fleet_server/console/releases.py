"""Releases: the firmware releases of the fleet (read-only) and, per release, its assignments with
each device's installation progress. Publishing and assigning are ``fleet-server release`` commands
and ``POST /api/v1/releases/{id}/assign``.
"""

from __future__ import annotations

from flask import Blueprint, abort, render_template

from fleet_server.console.rbac import Right, require
from fleet_server.console.services import services

bp = Blueprint("releases", __name__)


@bp.get("/")
@require(Right.VIEW_FLEET)
def index() -> str:
    return render_template("releases/list.html", releases=services().repo.releases.releases())


@bp.get("/<int(max=9223372036854775807):release_id>")
@require(Right.VIEW_FLEET)
def detail(release_id: int) -> str:
    repo = services().repo
    release = repo.releases.release_by_id(release_id)
    if release is None:
        abort(404)
    return render_template("releases/detail.html", release=release,
                           assignments=repo.releases.assignments(release_id=release_id, limit=200))
