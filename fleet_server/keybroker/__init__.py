"""The key broker's pure core: certification checks, data-key wrapping, business hours.

No I/O: bytes and values in, frozen dataclasses out or :class:`KeyRequestError`. The service that
uses it is :mod:`fleet_server.service.models`; the design is in docs/model-protection.md.
"""

from fleet_server.keybroker.broker import (
    BOUND_KEY_FORBIDDEN,
    BOUND_KEY_REQUIRED,
    DATA_KEY_SIZE,
    BootCounters,
    CertifiedKey,
    KeyRequestError,
    check_bound_key_public,
    check_key_request,
    wrap_data_key,
)
from fleet_server.keybroker.hours import BusinessHours

__all__ = [
    "BOUND_KEY_FORBIDDEN",
    "BOUND_KEY_REQUIRED",
    "DATA_KEY_SIZE",
    "BootCounters",
    "BusinessHours",
    "CertifiedKey",
    "KeyRequestError",
    "check_bound_key_public",
    "check_key_request",
    "wrap_data_key",
]
