"""The shared vocabulary of lora-serve: what the data path (`deployments`) and the control path
(`adapters_store`) both speak. It depends on neither, and imports no Ray, FastAPI, boto3 or
huggingface_hub (import-linter contracts in pyproject.toml keep it so).

    errors        every typed error, with its HTTP status and headers
    adapter_ids   `<tenant>/<name>` adapter ids and source URIs (s3://, hf://, local)
    peft_files    the file names of a PEFT adapter folder
    checkpoint    read and validate PEFT LoRA checkpoints (torch + safetensors)
    geometry      the slot geometry an adapter must fit, read from the base model's files
    payload       a checkpoint as the Ray object store shares it (numpy buffers)
    changes       the change messages the adapter store sends replicas
    settings      EngineConfig, StoreConfig, SourceInput: settings that cross processes
    base_models   the base models known by name, and the tiny test model's config
    files         file locks and atomic writes
    paths         default folders under the checkout's .cache/

Importing the package imports nothing else: import the module you need.
"""
