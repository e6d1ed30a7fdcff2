"""What a result was made with: the versions an export's provenance and a run's metrics record.

Its own module so that neither the config export (no torch) nor final training (no database)
has to import the other for it.
"""

from __future__ import annotations

import importlib.metadata


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on."""
    found = {}
    for name in ("cnnsearch", "torch", "torchvision", "optuna"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    if found["cnnsearch"] is None:  # running from a checkout that was never pip-installed
        import search

        found["cnnsearch"] = search.__version__
    return found
