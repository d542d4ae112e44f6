"""Staged rollouts, pure: plans and groups (:mod:`.plan`), the progress rules (:mod:`.engine`).

The storage is :mod:`fleet_server.storage.rollout_repo`; the steps that read and write it,
:mod:`fleet_server.service.rollouts`.
"""
