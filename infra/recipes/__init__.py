"""Recipes: how a record becomes one or more prompts, and (part 2) what is kept of the answers.

- `params`: the user's recipe (`RecipeParams`, the flow's nested `recipe` parameter).
- `templates`: the prompt template, sandboxed Jinja2 over the record's fields.
- `examples`: few-shot examples, k per record, chosen from the record's id.
- `recipe`: the loaded recipe (`Recipe`): renders a record, names what it changes in a run's config.

No Prefect here (infra/ rule); the flow loads the recipe once, the plan and the generation
pass use the same loaded object, so both render the same prompts.
"""

from infra.recipes.params import RecipeParams
from infra.recipes.recipe import Recipe, load_recipe

__all__ = ["Recipe", "RecipeParams", "load_recipe"]
