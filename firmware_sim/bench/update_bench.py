"""Benchmark: signed A/B firmware updates on one simulated device, end to end.

One :class:`~firmware_sim.fleet.FleetHarness` with a single golden device provisioned for updates
(``FleetConfig(updates=True)``: ``fleet-server updates init``, the exported root in the agent's
``[update]``), the real ``fleet-server run`` serving the repository over MQTT and the real agent in an
agent host, whose reboots are power cycles (swtpm restart, measured boot of the trial slot).

``run()`` returns:

* ``update_apply_s_p50``: seconds from ``fleet-server release assign`` to the assignment recorded
  ``committed`` (download through TUF over MQTT, slot write, power cycle, attestation of the new
  release, commit), median of :data:`APPLY_ROUNDS` successive releases (1.3.0, 1.4.0, ...);
* ``tuf_refresh_ms_p50``: the agent's :meth:`~agent.update.tuf_client.UpdateClient.refresh` when the
  repository has nothing new (timestamp, and the probe for a newer root, over MQTT through the
  worker), median of :data:`REFRESH_ROUNDS`; measured with the device's own identity, state folder and
  configuration while its agent is stopped (one MQTT connection per client id).

About half a minute in all.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from agent.config import load_config
from agent.identity import DeviceIdentity
from agent.update.mqtt_fetcher import CHUNK_KIND
from agent.update.tuf_client import UpdateClient, measure_refresh_ms
from firmware_sim.fleet import FleetConfig, FleetHarness, HarnessError, running_fleet
from protocol import topics
from protocol.mqtt import MqttClient

APPLY_ROUNDS = 3
REFRESH_ROUNDS = 10
APPLY_TIMEOUT = 180.0
CONNECT_TIMEOUT = 30.0


def apply_seconds(harness: FleetHarness, device_id: str, version: str) -> float:
    """Publish ``version``, assign it to ``device_id`` and wait until the server records the commit;
    seconds from the assignment to the commit."""
    target = harness.publish_release(version)
    start = time.monotonic()
    assignment_id = harness.assign_release(target, [device_id])[device_id]
    deadline = start + APPLY_TIMEOUT
    while True:
        state = harness.assignments(target)[assignment_id]
        if state["state"] == "committed":
            return time.monotonic() - start
        if state["state"] in ("rolled_back", "failed"):
            raise HarnessError(f"update to {version} ended {state['state']}: {state['reason']}")
        if time.monotonic() > deadline:
            raise HarnessError(f"update to {version} not committed within {APPLY_TIMEOUT:.0f} s "
                               f"({state['state']})")
        time.sleep(0.05)


def refresh_ms(agent_toml: Path, rounds: int = REFRESH_ROUNDS) -> float:
    """Median ms of a refresh with nothing new, as the agent of ``agent_toml`` (stopped) makes it."""
    config = load_config(agent_toml)
    identity = DeviceIdentity(config.state_dir, config.device_id)
    client = MqttClient(config.mqtt.host, config.mqtt.port, identity.tls_files(config.mqtt.ca_cert),
                        client_id=config.device_id,
                        subscriptions=(topics.device_down_filter(config.device_id),))
    stop = threading.Event()
    chunk_topic = topics.device_down(config.device_id, CHUNK_KIND)
    update = UpdateClient.from_config(config, client)

    def pump() -> None:  # the agent's receive loop, reduced to the update channel
        while not stop.is_set():
            inbound = client.receive(0.1)
            if inbound is not None and inbound.topic == chunk_topic:
                update.fetcher.deliver(inbound.payload)

    client.start()
    thread = threading.Thread(target=pump, name="bench-tuf-pump", daemon=True)
    thread.start()
    try:
        client.wait_connected(CONNECT_TIMEOUT)  # connected and subscribed: no answer can be lost
        return measure_refresh_ms(update, rounds)
    finally:
        stop.set()
        thread.join(5)
        client.stop()


def run() -> dict[str, float]:
    config = FleetConfig(devices=1, interval=30.0, duration=None, updates=True)
    with running_fleet(config) as harness:
        [device_id] = harness.device_ids
        applied = [apply_seconds(harness, device_id, f"1.{3 + i}.0") for i in range(APPLY_ROUNDS)]
        harness.stop_agent(device_id)
        refresh = refresh_ms(harness.devices[device_id].agent_dir / "agent.toml")
    return {"update_apply_s_p50": statistics.median(applied), "tuf_refresh_ms_p50": refresh}


if __name__ == "__main__":  # pragma: no cover - manual use: python -m firmware_sim.bench.update_bench
    print(run())
