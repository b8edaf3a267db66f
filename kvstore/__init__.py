"""kvstore: the global CPU/SSD KV page store shared by every SGLang instance (issue 4)."""
