"""The flows named in prefect.yaml."""
