"""Lifecycle of one software TPM (swtpm): manufacture, start, stop, power-cycle, clean up.

Each simulated device owns one swtpm process listening on a pair of free loopback ports (command
port P, control port P+1, as the tpm2-tss ``swtpm`` TCTI expects).  Manufacturing creates the TPM
state with RSA and ECC EKs and EK certificates signed by a :class:`ManufacturerCA`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import TracebackType

from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.procutil import free_port_pair, stop_process, wait_for_port
from protocol.errors import ProcessError

SWTPM = "swtpm"
SWTPM_SETUP = "swtpm_setup"


class Swtpm:
    """One swtpm instance whose state lives in ``state_dir``.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.  ``tcti`` is the TCTI
    configuration string for tpm2-pytss and tpm2-tools while it runs.
    """

    def __init__(self, state_dir: Path, *, host: str = "127.0.0.1") -> None:
        self.state_dir = Path(state_dir)
        self.host = host
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- manufacturing -----------------------------------------------------------------------------
    @property
    def manufactured(self) -> bool:
        return (self.state_dir / "tpm2-00.permall").exists()

    def manufacture(self, ca: ManufacturerCA, *, pcr_banks: str = "sha1,sha256") -> None:
        """Create a fresh TPM state with EKs and EK certificates issued by ``ca`` (overwrites)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        conf_dir = self.state_dir.parent / (self.state_dir.name + ".setup")
        setup_conf = ca.write_swtpm_config(conf_dir, pcr_banks=pcr_banks)
        cmd = [SWTPM_SETUP, "--tpm2", "--tpmstate", str(self.state_dir), "--create-ek-cert",
               "--create-platform-cert", "--overwrite", "--config", str(setup_conf),
               "--pcr-banks", pcr_banks]
        try:
            res = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        except FileNotFoundError as exc:
            raise ProcessError("swtpm_setup is not installed (Debian package swtpm-tools)") from exc
        finally:
            shutil.rmtree(conf_dir, ignore_errors=True)
        if res.returncode != 0:
            tail = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise ProcessError(f"swtpm_setup failed ({res.returncode}): {tail[0]}")

    # -- running -----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def tcti(self) -> str:
        if self.port is None:
            raise ProcessError("swtpm is not running")
        return f"swtpm:host={self.host},port={self.port}"

    def start(self, *, attempts: int = 5) -> None:
        """Start swtpm on free ports; the TPM comes up with TPM2_Startup(CLEAR) done (fresh PCRs)."""
        if self.running:
            return
        if not self.manufactured:
            raise ProcessError(f"no TPM state in {self.state_dir}; manufacture it first")
        last: Exception | None = None
        for _ in range(attempts):
            port = free_port_pair(self.host)
            cmd = [SWTPM, "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}",
                   "--server", f"type=tcp,port={port},bindaddr={self.host}",
                   "--ctrl", f"type=tcp,port={port + 1},bindaddr={self.host}",
                   "--flags", "not-need-init,startup-clear"]
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
            except FileNotFoundError as exc:
                raise ProcessError("swtpm is not installed (Debian package swtpm)") from exc
            try:
                wait_for_port(port, proc, host=self.host)
                wait_for_port(port + 1, proc, host=self.host)
            except ProcessError as exc:  # most likely lost a race for the port: try another
                stop_process(proc)
                if proc.stderr is not None:
                    proc.stderr.close()
                last = exc
                continue
            self._proc, self.port = proc, port
            return
        raise ProcessError(f"swtpm did not start: {last}")

    def stop(self) -> None:
        """Stop the process (its state stays on disk); a later start is a power-on."""
        proc, self._proc = self._proc, None
        stop_process(proc)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        self.port = None

    def power_cycle(self) -> None:
        """Power off and on: PCRs reset, the TPM's resetCount increases, persistent state stays."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop and delete the TPM state."""
        self.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Swtpm:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort: never leave a process behind
        if self._proc is not None and self._proc.poll() is None:
            stop_process(self._proc)
