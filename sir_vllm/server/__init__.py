"""What `vllm serve --kv-policy ...` adds, and helpers to run such a server."""
