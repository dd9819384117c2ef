"""The test tiers: tests/unit (no Ray, no servers: `make test-unit`), tests/integration (a real
local Ray, real HTTP, moto's S3 server, the real SmolLM2 and torch.compile), tests/gpu (skipped
without CUDA). Shared helpers live in tests/support; shared fixtures in tests/support/fixtures.py."""

import os

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

pytest_plugins = ["tests.support.fixtures"]
