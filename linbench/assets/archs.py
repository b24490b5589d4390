"""The one list of model architectures linbench can linearize: transformers' model_type ->
family name. Each family's causal-LM class is `<family>ForCausalLM`, whose decoder layers
hold a `self_attn` with q/k/v/o projections and rotary embeddings."""

SUPPORTED_ARCHS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
CAUSAL_LM_CLASSES = tuple(f"{family}ForCausalLM" for family in SUPPORTED_ARCHS.values())
