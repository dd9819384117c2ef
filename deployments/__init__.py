"""The data path: the slot-indexed LoRA engine and the Ray Serve deployments around it. Built on
`adapters_store` and `lora_core`.

    engine/             the replica engine, usable without Ray (see its __init__)
    contracts           the frozen types that cross Ray: SamplingParams, GenerationRequest,
                        GenerationChunk, RoutingStats
    replica             LoraReplica: the Serve deployment around one engine
    deploy_config       what each deployment is built with (args) and what `serve deploy`
                        changes in place (user_config)
    store_subscription  the replica's side of the adapter store (resolver + change feed)
    router              the HTTP ingress: OpenAI-compatible API, tenants, admin API
    schemas/            the HTTP bodies: OpenAI requests and responses, streaming, admin
    http_errors         the one mapping from typed errors to HTTP answers
    ray_errors          typed errors back out of Ray's wrappers
    tenants             API keys -> tenants
    request_router      the adapter-affinity Ray Serve RequestRouter (glue)
    routing_policy      its score, pure Python
    app                 build_app(args): what `serve run` / `serve deploy` import

Importing this package imports neither Ray nor torch; each module pulls in what it needs, and the
ingress's modules never pull in torch (tests/unit/test_import_facts.py).
"""
