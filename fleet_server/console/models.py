"""Models: published models and versions, entitlements, which devices hold leases, query usage, and
the limits and output policy they carry - read from the model-protection tables
(:mod:`fleet_server.storage.model_tables`, owned by that area) when this build has them.

The page is read-only; changing models (write, delete, deploy) is the API's (``/api/v1``), under the
model rights of the matrix.
"""

from __future__ import annotations

from flask import Blueprint, render_template

from fleet_server.console.rbac import Right, require
from fleet_server.console.services import services

bp = Blueprint("models", __name__)


@bp.get("/")
@require(Right.MODEL_READ)
def index() -> str:
    svc = services()
    return render_template("models.html", sections=svc.queries.model_overview())
