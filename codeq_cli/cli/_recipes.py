"""``codeq recipes``: list the built-in recipes, or show one resolved."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from codeq_cli.cli import console
from codeq_cli.cli._options import JsonOpt


def _output(json_mode: bool, quiet: bool):
    return console.Output(json_mode=json_mode, quiet=quiet)


recipes_app = typer.Typer(help="List and show the built-in recipes.", no_args_is_help=False, invoke_without_command=True)


@recipes_app.callback()
def _recipes(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """List the built-in recipes with a one-line summary."""
    if ctx.invoked_subcommand is not None:
        return
    from codeq_cli.train.recipe import list_recipes

    items = list_recipes()
    width = max(len(n) for n, _ in items)
    human = "\n".join(f"{n:<{width}}  {summary}" for n, summary in items)
    _output(json_, False).result({"recipes": [{"name": n, "summary": s} for n, s in items]}, human)


@recipes_app.command("show")
def _recipes_show(
    name: Annotated[str, typer.Argument(help="A built-in recipe name or a YAML path.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Apply overrides before showing.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Print one recipe (resolved and validated) as YAML."""
    from codeq_cli.train.recipe import apply_overrides, load_recipe, recipe_to_yaml

    recipe = apply_overrides(load_recipe(name), list(set_ or []))
    _output(json_, False).result(recipe.to_dict(), recipe_to_yaml(recipe).rstrip())
