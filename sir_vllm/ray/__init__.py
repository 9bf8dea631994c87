"""sir-vllm on Ray Serve: N replicas, each serving what `vllm serve --kv-policy ...` serves.

    app.py            the builder (`sir-vllm serve-ray` and `serve run CONFIG.yaml` both call it)
    deploy.py         the Serve config for a set of options, applying it, waiting for the replicas
    options.py        the builder's arguments: the vllm serve flags, parsed once, and what Ray adds
    replica.py        the deployment: vLLM's own engine and app inside a replica
    router.py         the request router: a session stays on the replica holding its pins
    session_table.py  the router's bookkeeping (which replica holds which session), pure Python
    bench.py          figures: proxy-plus-router overhead, how sessions spread (live and simulated)
    scaling_bench.py  figures: turns/s with 1 and 2 replicas, scale-out, failover (one command)

Ray is an optional dependency (`pip install sir-vllm[ray]`); nothing else imports this package.
"""
