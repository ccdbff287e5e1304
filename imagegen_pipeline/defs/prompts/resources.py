"""How prompts are enhanced, per prompt set."""

import dagster as dg

from imagegen_pipeline.enhancement import PromptEnhancer, TemplateEnhancer


class PromptEnhancerResource(dg.ConfigurableResource):
    """Which enhancer each prompt set uses: "template" (offline), "gemini" or "ollama"."""

    default_method: str = "template"  # used for prompt sets not named in method_by_prompt_set
    method_by_prompt_set: dict[str, str] = {}  # noqa: RUF012 - e.g. {"product_shots": "gemini"}

    def method_for(self, prompt_set: str) -> str:
        """The enhancement method configured for ``prompt_set``."""
        return self.method_by_prompt_set.get(prompt_set, self.default_method)

    def create_enhancer(self, prompt_set: str) -> PromptEnhancer:
        """The enhancer for ``prompt_set``."""
        method = self.method_for(prompt_set)
        if method == "template":
            return TemplateEnhancer()
        raise ValueError(f"unknown enhancement method {method!r} for prompt set {prompt_set!r}")
