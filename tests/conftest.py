"""Test setup: 8 fake CPU devices so sharding is really exercised. CPU unless JAX_PLATFORMS
says otherwise (`JAX_PLATFORMS=cuda pytest -k gpu` runs the GPU kernel tests on a GPU)."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# On a GPU, pytest and the trainers it starts share the card: allocate on demand.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
