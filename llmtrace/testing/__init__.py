"""Test bed for llmtrace: tiny offline models, a real vLLM server, an OTLP
receiver and a streaming client. Used by the test suite and by ``make demo``."""
