"""The flows named in prefect.yaml."""

import logging

# PREFECT_LOGGING_EXTRA_LOGGERS=infra attaches Prefect's handlers to the `infra` logger, but it
# would still inherit the root's WARNING level: let its INFO lines reach the flow-run logs.
logging.getLogger("infra").setLevel(logging.INFO)
