"""The HTTP ingress's way to the adapter store: the detached actor, looked up by name.

The replicas create the store (`adapters_store.store.get_or_create_store`); the ingress only
finds it, so it needs neither the store's code nor what the store imports (boto3, the Hub client,
torch). Until a replica has created it, calls answer 503.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from lora_core.errors import ServiceUnavailableError
from lora_core.settings import StoreConfig

__all__ = ["StoreLookup"]

logger = logging.getLogger(__name__)


class StoreLookup:
    """Finds the store actor on first use and keeps its handle."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._handle: Any = None

    def handle(self) -> Any:
        if self._handle is None:
            try:
                self._handle = ray.get_actor(self.config.name, namespace=self.config.namespace)
            except ValueError:
                raise ServiceUnavailableError(
                    f"the adapter store {self.config.namespace}/{self.config.name} is not up yet "
                    "(the replicas start it); retry shortly"
                ) from None
        return self._handle
