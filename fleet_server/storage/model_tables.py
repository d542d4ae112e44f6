"""Tables of the model-protection area: published models and versions, entitlements, leases,
usage telemetry. (Imported by :mod:`fleet_server.storage.models`; migration 0002.)"""

from __future__ import annotations
