"""Framework integrations: :mod:`cachesync.contrib.fastapi` (FastAPI / Starlette), :mod:`cachesync.contrib.django`."""
