"""hf-plugins: recent LLM-systems research as plugins for the Hugging Face stack."""

__version__ = "0.1.0"
