"""`model_unlock_ms`: from a key release received to the first inference, for a 100 MB model.

A real swtpm device holds a PCR-bound key (TPM2_Create under the SRK, PolicyOR of PolicyPCR and
Certify); the server side wraps the package's data key to it with the key broker's own function.
Each round then does, timed: TPM2_RSA_Decrypt of the wrapped key in a policy session, decryption of
the 100 MB package into a fresh buffer (a first unlock, page faults included), the onnxruntime
session from bytes, the io check, and one inference through the guard. The median of the rounds is
reported, with the parts.
"""

from __future__ import annotations

import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from agent.inference.guard import ClientInfo, InferenceGuard, Lease, token_hash
from agent.tpm.adapter import TpmAdapter
from agent.vault.unlock import ModelBuffer, guard_policy, open_session
from firmware_sim.device import SimulatedDevice
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.testmodel import classifier_io_signature, large_classifier
from fleet_server.keybroker.broker import wrap_data_key
from protocol.messages import WRAP_LABEL, ModelPolicy, key_id
from protocol.modelpkg import build_package, read_manifest

SELECTION = {"sha256": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14)}


def run(rounds: int = 3, model_mb: int = 100) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="unlock-bench-"))
    device = SimulatedDevice.create(work / "device", ca=ManufacturerCA.load_or_create(work / "ca"))
    try:
        device.boot()
        model = large_classifier(target_mb=model_mb)
        signing = ec.generate_private_key(ec.SECP256R1())
        data_key = secrets.token_bytes(32)
        package = build_package(model, name="big", version="1.0.0", io_signature=classifier_io_signature(),
                                signing_key=signing, key_id=key_id(signing.public_key()), data_key=data_key,
                                created_at=int(time.time() * 1000))
        manifest = read_manifest(package, trusted_keys={key_id(signing.public_key()): signing.public_key()})
        policy = guard_policy(manifest, ModelPolicy(output_mode="label"))
        token = secrets.token_urlsafe(16)
        clients = {token_hash(token): ClientInfo(client_id="bench")}
        row = {"input": np.full((1, 16), 0.5, dtype=np.float32)}
        totals: list[float] = []
        parts: dict[str, list[float]] = {"unwrap": [], "decrypt_load": [], "first_inference": []}
        with TpmAdapter(device.tcti, work / "agent-tpm") as tpm:
            key = tpm.create_bound_key(SELECTION)
            wrapped = wrap_data_key(data_key, key.public)
            for _ in range(rounds):
                t0 = time.perf_counter()
                secret = bytearray(tpm.unwrap(key, wrapped, WRAP_LABEL))
                t1 = time.perf_counter()
                runtime = open_session(package, manifest, secret, ModelBuffer())
                t2 = time.perf_counter()
                guard = InferenceGuard(policy, runtime, clients, time.time, lambda record: None,
                                       lease=Lease(lease_id="0" * 32, expires_at=time.time() + 3600))
                guard.predict(token, row)
                t3 = time.perf_counter()
                runtime.close()
                secret[:] = bytes(len(secret))
                totals.append((t3 - t0) * 1000)
                parts["unwrap"].append((t1 - t0) * 1000)
                parts["decrypt_load"].append((t2 - t1) * 1000)
                parts["first_inference"].append((t3 - t2) * 1000)
        out = {"model_unlock_ms": statistics.median(totals)}
        out.update({f"model_unlock_{k}_ms": statistics.median(v) for k, v in parts.items()})
        out["model_unlock_size_mb"] = manifest.plaintext_size / 1e6
        return out
    finally:
        device.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    for k, v in run().items():
        print(f"{k}: {v:.1f}")
