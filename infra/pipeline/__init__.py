"""Pipelines: several generation stages, each reading the kept rows of the stage before it.

- `fields`: the settings a run and a pipeline stage share, defined once (flows/params.py RunParams
  takes its fields from here).
- `model`: the pipeline file's model (`Pipeline`, `Stage`, `Server`) and its graph checks.
- `hashes`: each stage's config hash, its own settings plus its parent's hash.
- `invalidate`: what a rerun of a changed file does with each stage (generated again, re-curated,
  made again reusing rows, refused), decided and acted on before anything is allocated.
- `reuse`: a stage's completions from before a change, given back to the same requests.
- `files`: reading a pipeline file (YAML or JSON, local or s3) with bounds on what a hostile file costs.
- `check`: what `nemotron-sdg check --pipeline` does: every template checked against the fields its
  parent provides and rendered on the first input rows, without a server.

Executing a pipeline (`run --pipeline`) is not built yet. No Prefect here (infra/ rule).
"""
