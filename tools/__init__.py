"""llm-fine-tuning tools: plain functions taking and returning pydantic models."""
__version__ = "0.1.0"
