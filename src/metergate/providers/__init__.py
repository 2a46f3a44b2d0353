"""Provider adapters: one module per provider API, all behind the interfaces in `base`."""

from __future__ import annotations

import os

from metergate.config import ProviderConfig
from metergate.endpoints import Family
from metergate.providers.anthropic import AnthropicApi, AnthropicUpstream
from metergate.providers.azure import AzureUpstream
from metergate.providers.base import ApiAdapter, RequestFacts, StreamMeter, Upstream
from metergate.providers.gemini import GeminiApi, GeminiUpstream
from metergate.providers.openai import OpenAIApi, OpenAIUpstream

API_ADAPTERS: dict[Family, ApiAdapter] = {
    "openai": OpenAIApi(),
    "anthropic": AnthropicApi(),
    "gemini": GeminiApi(),
}

_UPSTREAMS: dict[str, type[Upstream]] = {
    "openai": OpenAIUpstream,
    "openai-compatible": OpenAIUpstream,
    "azure-openai": AzureUpstream,
    "anthropic": AnthropicUpstream,
    "gemini": GeminiUpstream,
}


def build_upstream(name: str, config: ProviderConfig) -> Upstream:
    secret = os.environ.get(config.api_key_env) if config.api_key_env else None
    return _UPSTREAMS[config.type](name, config, secret)


__all__ = ["API_ADAPTERS", "ApiAdapter", "RequestFacts", "StreamMeter", "Upstream", "build_upstream"]
