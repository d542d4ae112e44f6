"""Schemathesis over every operation of the served OpenAPI description, in process against the WSGI
application, with an Admin token and a database holding a real fleet (devices appraised by the real
Processor, a policy, a published model, an alert): no response is a server error, and every
response's status code, content type and body conform to the description.

Deterministic and bounded: hypothesis is derandomized, has no example database and no deadline; each
operation gets its documented examples (real ids), then at most :data:`POSITIVE` generated cases and
:data:`NEGATIVE` cases that violate the schema (those must be refused with a documented 4xx, never a
5xx). Reads run first, on the seeded data; then the operations that change it (revoke, retire...),
which change the data the later ones see - part of the point.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err, Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fleet_server.console import openapi
from fleet_server.console.services import ConsoleServices
from fleet_server.service.processor import Processor

pytest.register_assert_rewrite("browser_fixtures")
from browser_fixtures import seed_fleet  # noqa: E402

pytest_plugins = ("console_fixtures",)

POSITIVE = 25
NEGATIVE = 8
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
NEGATIVE_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance]


def _run(strategy: st.SearchStrategy[Any], headers: dict[str, str], checks: list[Any], examples: int,
         seen: list[int]) -> None:
    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=strategy)
    def check(case: Any) -> None:
        response = case.call(headers=headers)
        seen.append(response.status_code)
        case.validate_response(response, checks=checks)

    check()


def test_every_operation_conforms_and_never_fails(app: Flask, svc: ConsoleServices,
                                                  console_processor: Processor) -> None:
    seed_fleet(svc, console_processor)
    _, secret = svc.accounts.create_token("schemathesis", "admin", created_by="test", now=svc.now())
    headers = {"Authorization": f"Bearer {secret}"}
    schema = schemathesis.openapi.from_wsgi(f"{openapi.PREFIX}/openapi.json", app)
    results = list(schema.get_all_operations())
    assert all(isinstance(r, Ok) for r in results), [r.err() for r in results if isinstance(r, Err)]
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    described = {f"{o.method.upper()} {openapi.PREFIX}{o.path}" for o in openapi.OPERATIONS}
    # Schemathesis leaves out the operation that serves the description it was loaded from.
    assert {o.label for o in operations} == described - {f"GET {openapi.PREFIX}/openapi.json"}
    # Reads first (on the seeded data), then the operations that change or remove it.
    operations.sort(key=lambda o: (o.method.upper() != "GET", o.label))
    statuses: dict[str, list[int]] = {}
    for operation in operations:
        seen = statuses.setdefault(operation.label, [])
        for strategy in schema.get_strategies_from_examples(operation):
            _run(strategy, headers, CHECKS, 1, seen)
        _run(operation.as_strategy(), headers, CHECKS, POSITIVE, seen)
        _run(operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE), headers,
             NEGATIVE_CHECKS, NEGATIVE, seen)
    assert all(seen for seen in statuses.values())
    # The generated requests reached real data, not only the validation layer.
    for label in ("GET /api/v1/devices/{device_id}", "GET /api/v1/models/{name}",
                  "GET /api/v1/policies/{policy_id}", "GET /api/v1/devices"):
        assert 200 in statuses[label], (label, sorted(set(statuses[label])))
    assert all(code < 500 for codes in statuses.values() for code in codes)
