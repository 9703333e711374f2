"""Side effects and the pure code beside them. No Prefect import anywhere under infra/."""
