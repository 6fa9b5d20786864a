"""Field updates: signed model bundles, installed by a device agent with golden check and rollback.

| module | concept |
|---|---|
| ``errors.py`` | the typed, user-facing errors of the update path |
| ``manifest.py`` | the signed bundle manifest: fields, canonical JSON, strict parser |
| ``signing.py`` | Ed25519 keys, signatures, the device trust store and key rotation |
| ``bundle.py`` | the archive: writing, verifying before extraction, safe extraction |
| ``golden.py`` | golden vectors: making them and checking a prepared model against them |
| ``device.py`` | what the device is (runtime, TensorRT, hardware) and bundle compatibility |
| ``prepare.py`` | turning a staged bundle into a runnable model (TensorRT engine or ONNX Runtime) |
| ``durable.py`` | crash-safe file system primitives (fsync'd writes, atomic symlink switch) |
| ``state.py`` | the device's update state (anti-rollback counter, pending switch, history) |
| ``installer.py`` | the device agent: apply, status, rollback, recovery after a crash |
| ``reload.py`` | the running runtime picking up a new model between series |
| ``packaging.py`` | making a bundle from a model (used by ``tools/package_update.py``) |
| ``commands.py`` | ``edge update apply|status|rollback|trust`` |

``cryptography`` (Ed25519) is imported lazily: the rest of the runtime works without it.
"""
