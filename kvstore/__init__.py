"""kvstore: placeholder package; built by a later issue."""
