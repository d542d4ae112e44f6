"""The reboot of a real device: run the configured command (``update.reboot_command``, by default
``systemctl reboot``).

:class:`CommandRebooter` starts the command and returns without waiting (the agent's update thread
must not block; the machine goes down under the agent).  A command that cannot be started is a
:class:`~protocol.errors.ProcessError`: the install record stays where it is and the next start
resumes from it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from protocol.errors import ProcessError


class CommandRebooter:
    """A :class:`~agent.update.bootctl.Rebooter` that runs ``command`` (no shell)."""

    def __init__(self, command: Sequence[str]) -> None:
        if not command:
            raise ValueError("the reboot command is empty")
        self.command = tuple(command)
        self.process: subprocess.Popen[bytes] | None = None
        """The last reboot command started (kept so it is not reaped as a leaked child)."""

    def reboot(self, reason: str) -> None:
        try:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise ProcessError(f"cannot run the reboot command {self.command[0]!r}: "
                               f"{exc.strerror or exc}") from None
