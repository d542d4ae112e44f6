"""The agent's side of signed updates: A/B boot control, the TUF client over MQTT, install and commit."""
