"""broker: find and rent the cheapest GPU box that fits, across clouds.

The public API: :class:`GPUClient` (search, and instance lifecycle), the offer and instance types,
the query language (:func:`parse`, field references on the client), and one exception tree.
"""

from __future__ import annotations

from broker.client import GPUClient, ProviderReport, SearchResult
from broker.config import Settings, load_settings
from broker.errors import (
    AuthError,
    BrokerError,
    ConfigError,
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    ProvisionError,
    QueryError,
    RateLimitedError,
    StaleOfferError,
)
from broker.lifecycle import parse_ttl
from broker.query import F, Query, parse, to_text
from broker.types import (
    CloudType,
    CreateRequest,
    GPUOffer,
    Instance,
    InstanceStatus,
    Manufacturer,
    SSHEndpoint,
    StockLevel,
)

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "BrokerError",
    "CloudType",
    "ConfigError",
    "CreateRequest",
    "F",
    "GPUClient",
    "GPUOffer",
    "Instance",
    "InstanceStatus",
    "InvalidRequestError",
    "Manufacturer",
    "NoCapacityError",
    "NotFoundError",
    "ProviderError",
    "ProviderReport",
    "ProviderUnavailableError",
    "ProvisionError",
    "Query",
    "QueryError",
    "RateLimitedError",
    "SSHEndpoint",
    "SearchResult",
    "Settings",
    "StaleOfferError",
    "StockLevel",
    "load_settings",
    "parse",
    "parse_ttl",
    "to_text",
]
