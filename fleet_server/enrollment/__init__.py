"""Enrollment: pure checks of a device's TPM identity (no I/O).

* :mod:`.ekcert` - EK certificate chain to the trusted TPM manufacturer CAs; EK public area checks;
* :mod:`.credential` - TPM2_MakeCredential in software (TPM 2.0 Part 1, 24 'Credential Protection');
* :mod:`.request` - every check of an ``enroll.request`` that needs no database.
"""

from fleet_server.enrollment.credential import CredentialError, make_credential
from fleet_server.enrollment.ekcert import (
    EkCertificateError,
    EkIdentity,
    check_ek_public_matches,
    load_trust_bundle,
    verify_ek_certificate,
)
from fleet_server.enrollment.request import (
    AkError,
    EnrollmentCandidate,
    check_enrollment_request,
    expected_proof,
)

__all__ = [
    "AkError",
    "CredentialError",
    "EkCertificateError",
    "EkIdentity",
    "EnrollmentCandidate",
    "check_ek_public_matches",
    "check_enrollment_request",
    "expected_proof",
    "load_trust_bundle",
    "make_credential",
    "verify_ek_certificate",
]
