"""Appraisal: reference policies and the verdict on attestation evidence (pure, no I/O).

* :mod:`fleet_server.appraisal.policy` - :class:`ReferencePolicy` (reference PCR values and events per
  device class and firmware), its strict JSON form, and ``policy_from_eventlog``;
* :mod:`fleet_server.appraisal.appraise` - ``appraise`` (quote, TPM clock, event log, reference
  values), the per-boot ``BootState`` and its ``BootStateCache``;
* :mod:`fleet_server.appraisal.releases` - which reference values a device may match while it
  installs a firmware release (assigned, deadline, commit, grace), and the choice among them.

Import from the submodules.  (Nothing is re-exported here on purpose: a package attribute named
``appraise`` would shadow the submodule of that name for ``import fleet_server.appraisal.appraise``.)
"""
