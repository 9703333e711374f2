"""A run's bookkeeping under {output_uri}/{run_id}/: lease, manifest, part states."""
