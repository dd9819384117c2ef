"""The file names of a PEFT adapter folder, with no imports, so that listing a bucket needs no torch."""

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHT_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PROBE_FILE = "probe.json"
"""Optional, beside the adapter: {"prompt", "expected"}; a replica checks each new version with it."""
