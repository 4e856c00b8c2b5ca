"""schemathesis fuzzes the running app (gunicorn, PostgreSQL, Redis, a worker, the simulator)
from its own OpenAPI document: no generated request may get a 5xx, a status the document does
not list, or an answer that does not match its schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from models import State
from tests.support import make_course, make_enrollment, make_user

pytestmark = pytest.mark.integration

CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    )
)


def test_the_document_is_served_and_names_every_route(web):
    document = requests.get(f"{web}/api/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.0")
    assert {"/webhooks/ikhokha", "/api/enrollments", "/api/admin/dead-letters"} <= set(
        document["paths"]
    )


def test_generated_requests_get_answers_the_document_allows(web, simulator, worker, db, tmp_path):
    # Rows for generated ids to land on: a course, a waiting EFT enrollment, an admin.
    _, admin = make_user(db, role="admin")
    make_enrollment(db, method="eft", state=State.PENDING_APPROVAL, course=make_course(db))
    db.commit()
    st = str(Path(sys.executable).parent / "st")
    result = subprocess.run(
        [
            st,
            "run",
            f"{web}/api/openapi.json",
            "--checks",
            CHECKS,
            "--header",
            f"Authorization: Bearer {admin}",
            "--max-examples",
            "30",
            "--seed",
            "20261122",
            "--phases",
            "examples,coverage,fuzzing",
            "--workers",
            "2",
            "--request-timeout",
            "20",
            "--no-color",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # schemathesis keeps a cache in its working directory
    )
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
    # Every operation of the document was exercised, and none failed.
    from xml.etree import ElementTree

    from web.openapi import OPERATIONS

    [report] = tmp_path.glob("junit-*.xml")
    suite = ElementTree.parse(report).getroot()  # noqa: S314 - our own report
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == (
        str(len(OPERATIONS)),
        "0",
        "0",
    )
