"""Tables of the console area: users, sessions, API tokens, login throttling, audit log.
(Imported by :mod:`fleet_server.storage.models`; migration 0003.)"""

from __future__ import annotations
