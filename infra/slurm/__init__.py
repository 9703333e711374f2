"""Slurm: the model server as a Slurm job.

- `spec.py`: `SbatchSpec`, every value of the job, validated when built (the job dir's layout);
- `launch.py`: what differs per serving engine (image, tasks per node, the server's command);
- `options.py`: the checks on site-given sbatch/srun options, mounts, images and environment;
- `render.py`: the batch script and the node launcher, rendered from the spec and written;
- `parse.py`: Slurm's printed output turned into values (`JobState`, `JobSummary`), pure;
- `client.py`: `SlurmClient`, submit, state, find, cancel and locate jobs through one command runner;
- `backend.py`: the `slurm` backend a run uses, built from settings and a profile;
- `steps.py`: a pipeline's reward server swapped into the generator's job as its next step.
"""
