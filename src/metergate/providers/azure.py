"""Azure OpenAI: the OpenAI API behind deployment paths, an `api-version` query and an `api-key` header.

Clients may call the gateway the Azure way (`AzureOpenAI` SDK: `/openai/deployments/{deployment}/...`) or the
OpenAI way (`/v1/chat/completions` with a model name); both reach the same deployment. Azure reports the
underlying model version in responses, never the deployment name, so pricing uses the configured
deployment -> model map.
"""

from __future__ import annotations

from metergate.endpoints import EndpointMatch
from metergate.providers.base import Upstream, join_url
from metergate.query import with_item, without

_DEPLOYMENT_SUFFIX = {
    "chat": "chat/completions",
    "completions": "completions",
    "embeddings": "embeddings",
    "images": "images/generations",
    "image_edit": "images/edits",
    "transcription": "audio/transcriptions",
    "translation": "audio/translations",
    "speech": "audio/speech",
}


class AzureUpstream(Upstream):
    family = "openai"

    def serves(self, match: EndpointMatch) -> bool:
        return match.endpoint.family == "openai"

    def deployment_for(self, model: str) -> str:
        deployments = self.config.deployments
        if model in deployments:
            return model
        for deployment, mapped in deployments.items():
            if mapped == model:
                return deployment
        return model

    def url(self, match: EndpointMatch, path: str, query: str, upstream_model: str) -> str:
        endpoint = match.endpoint
        if path.startswith("/openai/v1/"):
            query = without(query, "api-version")  # the v1 API is unversioned
        elif match.endpoint.handling != "relay" and path.startswith("/v1/"):
            # A forwarded OpenAI-style call (files, batches): Azure serves it as its unversioned v1 API.
            path, query = "/openai" + path, without(query, "api-version")
        else:
            query = with_item(query, "api-version", self.config.api_version or "")
            if endpoint.azure_path and match.path_model is not None:
                path = path.replace(
                    f"/deployments/{match.path_model}/",
                    f"/deployments/{self.deployment_for(upstream_model)}/",
                    1,
                )
            elif endpoint.operation == "responses":
                path = "/openai/responses"
            elif endpoint.operation in _DEPLOYMENT_SUFFIX:
                deployment = self.deployment_for(upstream_model)
                path = f"/openai/deployments/{deployment}/{_DEPLOYMENT_SUFFIX[endpoint.operation]}"
        return join_url(self.config.base_url, path, query)

    def auth_headers(self) -> dict[str, str]:
        return {"api-key": self._secret} if self._secret else {}

    def wire_model(self, upstream_model: str) -> str:
        return self.deployment_for(upstream_model)

    def pricing_model(self, upstream_model: str) -> str:
        return self.config.deployments.get(upstream_model, upstream_model)
