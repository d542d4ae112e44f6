"""The model store of the fleet server: publishing encrypted packages, the key-encryption key that
protects their data keys at rest, usage policies, and the administrator operations on models.

* :mod:`fleet_server.modelstore.store` - :func:`publish_model`, :class:`PackageStore` (files);
* :mod:`fleet_server.modelstore.kek` - the KEK and sealed data keys;
* :mod:`fleet_server.modelstore.onnxio` - ONNX validation and io signature;
* :mod:`fleet_server.modelstore.policy` - usage policies from TOML or ``key=value`` settings;
* :mod:`fleet_server.modelstore.admin` - entitlements and policy changes.

See docs/model-protection.md, "Server side".
"""
