"""Ray jobs: one-off work submitted to a running cluster (`ray job submit -- python -m cluster.jobs.<job>`).

    export    merge an adapter (or a merge recipe) into the base model and save it as a plain
              transformers model folder, locally or on S3, after checking its logits
"""
