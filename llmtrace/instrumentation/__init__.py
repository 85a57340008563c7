"""Integrations, one subpackage each (``vllm``; routers and the torch profiler follow)."""
