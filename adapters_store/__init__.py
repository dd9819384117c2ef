"""The control path for adapter weights: where they come from, what the store knows, how
replicas hear of changes. Built on `lora_core`; never imports `deployments`.

    sources/        LocalSource, S3Source (boto3), HubSource (huggingface_hub) behind one Protocol
    registry        pydantic adapter records and the atomic manifest they persist in
    syncer          AdapterSyncer: sync sources, validate, keep versions (no Ray)
    change_feed     ChangeFeed: the long-poll replicas follow (no Ray)
    merging         MergeSpec, merge_adapters: PEFT's add_weighted_adapter on a weightless skeleton (no Ray)
    store           AdapterStore: the detached Ray actor around the syncer and the feed
    client          StoreLookup: how the HTTP ingress finds the store (no boto3, no torch)
    pull            `python -m adapters_store.pull URI DEST`: mirror a source into a folder
"""
